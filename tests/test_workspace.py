"""The one scratch policy: per-thread buffers by role, a cap on the total, release at thread end."""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from normffn import _workspace as ws


@pytest.fixture
def limit():
    """Run with a small cap and a clean slate for this thread; restore afterwards."""
    ws.release()
    old = ws.workspace_limit()
    yield ws.set_workspace_limit
    ws.set_workspace_limit(old)
    ws.release()


def _wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        gc.collect()
        time.sleep(0.01)
    return cond()


def test_reuse_by_role_and_dtype(limit):
    limit(1 << 30)
    others = ws.cached_bytes()   # buffers of other live threads (thread pools of earlier tests)
    a = ws.workspace("a", 100)
    assert a.shape == (100,) and a.dtype == np.float64
    assert np.shares_memory(ws.workspace("a", 50), a)          # reused, a prefix
    assert not np.shares_memory(ws.workspace("b", 50), a)      # another role
    f = ws.workspace("a", 10, np.float32)
    assert f.dtype == np.float32 and not np.shares_memory(f, a)
    big = ws.workspace("a", 1000)                              # grows: the old one is dropped
    assert big.shape == (1000,)
    assert ws.cached_bytes() - others == 1000 * 8 + 50 * 8 + 10 * 4


def test_count_zero_and_huge_buffers_not_kept(limit):
    assert ws.workspace("z", 0).shape == (1,)
    before = ws.cached_bytes()
    n = ws.MAX_BUFFER_BYTES // 8 + 1
    ws.workspace("huge", n)
    assert ws.cached_bytes() == before


def test_cap_holds_across_many_threads(limit):
    cap = limit(64 << 10)
    assert cap == 64 << 10
    seen = []
    start = threading.Barrier(50)
    done = threading.Event()

    def worker(i):
        start.wait()
        for role in ("fwd", "bwd", "hidden"):
            buf = ws.workspace(role, 1000 + i)   # 8 KB each: 150 requests, 1.2 MB in all
            buf[:] = i                           # usable even when not cached
            seen.append(ws.cached_bytes())
        done.wait()                              # all alive at once

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    assert _wait_for(lambda: len(seen) == 150)
    alive_total = ws.cached_bytes()
    assert max(seen) <= cap and alive_total <= cap
    assert alive_total > cap // 2            # the cache is used, up to the cap
    done.set()
    for t in threads:
        t.join()
    # every worker is gone: what they held is released
    assert _wait_for(lambda: ws.cached_bytes() == 0), ws.cached_bytes()


def test_thread_end_releases_only_that_thread(limit):
    limit(1 << 20)
    mine = ws.workspace("mine", 1000)
    mine_bytes = ws.cached_bytes()
    assert mine_bytes == 8000
    t = threading.Thread(target=lambda: ws.workspace("theirs", 2000))
    t.start()
    t.join()
    assert _wait_for(lambda: ws.cached_bytes() == mine_bytes)
    assert np.shares_memory(ws.workspace("mine", 10), mine)   # this thread's buffer survives


def test_lowering_the_cap_drops_buffers(limit):
    limit(1 << 20)
    ws.workspace("a", 10_000)
    assert ws.cached_bytes() == 80_000
    limit(1000)
    assert ws.cached_bytes() == 0
    ws.workspace("a", 10_000)                # over the cap: handed out, not kept
    assert ws.cached_bytes() == 0
    limit(0)
    ws.workspace("b", 1)
    assert ws.cached_bytes() == 0
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        limit(-1)


def test_layer_norm_backward_uses_the_workspace(limit, rng):
    import normffn

    limit(None)
    x = rng.standard_normal((64, 256))
    w = np.ones(256)
    _, ctx = normffn.layer_norm_forward(x, 256, w, w)
    before = ws.cached_bytes()
    normffn.layer_norm_backward(x, ctx)
    after = ws.cached_bytes()
    assert after > before
    normffn.layer_norm_backward(x, ctx)
    assert ws.cached_bytes() == after          # reused, not grown

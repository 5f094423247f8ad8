"""Scale-out benchmark for normffn.dask (issue #15) — a script, not part of the asv suite.

LayerNorm forward over a large float32 (rows x 1024) array in 64 MiB chunks on a LocalCluster of
2 single-thread worker processes, against:

* one in-process ``normffn.layer_norm`` call per chunk (all threads), summed over the chunks:
  the rate the cluster should approach (target: >= 60% of it);
* the machine's copy bandwidth (an all-thread copy of one chunk, same bytes per chunk);
* BatchNorm training statistics over the same array (one read) against the copy bandwidth for
  one read.

Each chunk of x is one 64 MiB array cached per worker (made once, reused for every block), so
the run measures normffn and dask, not a random-number generator, and memory per worker stays a
few chunks; y is reduced to one value per chunk on the workers, so nothing of size x crosses
the network.

    python benchmarks/dask_scale.py --gib 8       # the issue's size (2^21 x 1024 float32)
    python benchmarks/dask_scale.py --gib 0.5     # a quick run

Prints a small table and, with --json FILE, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

D = 1024
CHUNK_BYTES = 64 << 20
_CACHE: dict = {}


def _chunk(block_info=None, rows=0):
    """The worker's cached input chunk (same values for every block)."""
    if rows not in _CACHE:
        rng = np.random.default_rng(0)
        _CACHE[rows] = (3.0 + rng.standard_normal((rows, D))).astype(np.float32)
    return _CACHE[rows]


def _first(b):
    return np.asarray(b[:1, :1], dtype=np.float64)


def _block_sum(a):
    return np.asarray([[a.sum(dtype=np.float32)]])


def _best(f, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def main() -> int:
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import normffn
    import normffn.dask as nd

    # tasks must call this file's functions by reference (a function of __main__ would be
    # pickled by value, with a fresh, empty chunk cache in every task)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dask_scale as me

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8.0, help="size of x in GiB (default 8)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    rows_per_chunk = CHUNK_BYTES // (D * 4)
    nchunks = max(1, int(round(args.gib * (1 << 30) / CHUNK_BYTES)))
    rows = rows_per_chunk * nchunks
    nbytes = rows * D * 4
    w = np.ones(D, np.float32)
    b = np.zeros(D, np.float32)

    # in-process references on one chunk
    x0 = me._chunk(rows=rows_per_chunk)
    out = np.empty_like(x0)
    normffn.layer_norm(x0, D, w, b)
    one_alloc, _ = _best(lambda: normffn.layer_norm(x0, D, w, b), 5)
    one_out, _ = _best(lambda: normffn.layer_norm(x0, D, w, b, out=out), 5)
    try:
        from normffn._kernels import _bench
        copy = lambda: _bench.parallel_copy(out.reshape(-1).view(np.uint8),  # noqa: E731
                                            x0.reshape(-1).view(np.uint8))
    except (ImportError, AttributeError):
        copy = lambda: np.copyto(out, x0)  # noqa: E731
    copy()
    t_copy, _ = _best(copy, 5)
    copy_gbs = 2 * x0.nbytes / t_copy / 1e9

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.upload_file(os.path.abspath(__file__))
        x = da.map_blocks(me._chunk, rows=rows_per_chunk, dtype=np.float32,
                          chunks=((rows_per_chunk,) * nchunks, (D,)))
        y = nd.layer_norm(x, D, w, b)
        probe = y.map_blocks(me._first, chunks=((1,) * nchunks, (1,)), dtype=np.float64).sum()
        warm = x.map_blocks(me._first, chunks=((1,) * nchunks, (1,)), dtype=np.float64).sum()
        client.compute(warm, sync=True)   # every worker builds its cached chunk once
        client.compute(probe, sync=True)  # warm the kernels and the workers' allocators
        t_ln, t_ln_med = _best(lambda: client.compute(probe, sync=True), args.repeat)

        # BatchNorm training statistics: one read of x
        xb = x  # as (N, C) with C = 1024
        stats = nd._batch_norm.batch_statistics(xb)
        client.compute(stats, sync=True)
        t_bn, t_bn_med = _best(lambda: client.compute(stats, sync=True), args.repeat)
        # the read-only baseline: touch every chunk (a sum) on the same cluster
        touch = x.map_blocks(me._block_sum,
                             chunks=((1,) * nchunks, (1,)), dtype=np.float32).sum()
        client.compute(touch, sync=True)
        t_touch, _ = _best(lambda: client.compute(touch, sync=True), args.repeat)

    res = {
        "gib": nbytes / (1 << 30), "chunks": nchunks, "rows": rows, "d": D,
        "copy_GBps": copy_gbs,
        "ln_inprocess_alloc_GBps": 2 * nbytes / (one_alloc * nchunks) / 1e9,
        "ln_inprocess_out_GBps": 2 * nbytes / (one_out * nchunks) / 1e9,
        "ln_cluster_GBps": 2 * nbytes / t_ln / 1e9,
        "ln_cluster_median_s": t_ln_med,
        "bn_stats_cluster_GBps": nbytes / t_bn / 1e9,
        "bn_stats_median_s": t_bn_med,
        "read_sum_cluster_GBps": nbytes / t_touch / 1e9,
    }
    res["ln_cluster_vs_inprocess_alloc"] = res["ln_cluster_GBps"] / res["ln_inprocess_alloc_GBps"]
    res["bn_stats_vs_copy_one_read"] = res["bn_stats_cluster_GBps"] / (copy_gbs / 2)
    print(f"x: {res['gib']:.2f} GiB float32 ({rows} x {D}), {nchunks} chunks of 64 MiB; "
          f"LocalCluster 2 workers x 1 thread")
    for k, v in res.items():
        if isinstance(v, float):
            print(f"  {k:34s} {v:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

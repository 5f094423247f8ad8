"""Scale-out benchmark for normffn.dask (issue #15) — a script, not part of the asv suite.

LayerNorm forward and BatchNorm training statistics over a large float32 (rows x 1024) array in
64 MiB chunks on a LocalCluster of 2 single-thread worker processes, each figure printed beside
the in-process rate it is a share of and beside the floors measured in the same run:

* ``ln``: the cluster's LayerNorm rate (bytes read + written) against one in-process
  ``normffn.layer_norm`` call per chunk, all threads, allocating its output as the cluster's
  tasks do (the issue's target: >= 60%);
* ``bn``: the cluster's BatchNorm statistics rate (bytes read) against the in-process copy
  bandwidth counted for one read, i.e. the bytes of x a copy gets through per second (target:
  >= 60%);
* floors, not normffn's: a plain Dask read-and-sum (``np.sum`` per chunk) and a no-op per chunk
  on the same cluster, each against its in-process counterpart, and per-chunk task times from
  the task stream (how much of the wall time the 2 workers spend inside tasks);
* per worker: CPU time, page faults per chunk, peak and final RSS; the CPU time of this process
  (client and scheduler); and the "cpu-bound" rate all that CPU time allows on 2 cores, which
  other load on the machine moves much less than the wall-time rates;
* ``*_tuned``: LayerNorm, the statistics and the no-op again, on a second cluster set up as a
  user can set up theirs: the workers' malloc keeps freed chunks for the next output
  (``MALLOC_ARENA_MAX=1`` and mmap/trim thresholds above the chunk size in their start
  environment), so no output lands on fresh pages, and the scheduler sends tasks ahead
  (``distributed.scheduler.worker-saturation: inf``), which halves Dask's own cost per chunk
  here.  Read tuned LayerNorm against the in-process call with ``out=`` (no fresh pages either).

Input chunks are made on the workers, not shipped: each process keeps ``--sources`` distinct
64 MiB chunks (8 by default: 512 MiB per process, more than this VM's 480 MiB L3, so reads come
from memory as they would from real data) and block i reads source ``i % sources``.  The
in-process references cycle through the same number of chunks.  Results are reduced to one
value per chunk on the workers, so nothing of the size of x crosses the network.  Each graph is
computed once to warm up, then ``--repeat`` times; the best run counts.  The in-process
references are measured before and after the clusters; the better of the two counts.

    python benchmarks/dask_scale.py --gib 8       # the issue's size (2^21 x 1024 float32)
    python benchmarks/dask_scale.py --gib 1       # a quick run

Prints a table and, with --json FILE, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

D = 1024
CHUNK_BYTES = 64 << 20
_CACHE: dict = {}
_HERE = os.path.abspath(__file__)  # uploaded to the workers (an upload re-imports it elsewhere)


# ---------------------------------------------------------------------------------------------
# tasks (this module is uploaded to the workers and called by reference)
def _source(rows, i):
    """Source chunk ``i``: made once per process, then reused."""
    if (rows, i) not in _CACHE:
        rng = np.random.default_rng(i)
        _CACHE[rows, i] = (3.0 + rng.standard_normal((rows, D))).astype(np.float32)
    return _CACHE[rows, i]


def _chunk(block_info=None, rows=0, sources=1):
    """Block ``k`` of x: the process's source chunk ``k % sources``."""
    k = block_info[None]["chunk-location"][0] if block_info else 0
    return _source(rows, k % sources)


def _make_sources(rows, sources):
    for i in range(sources):
        _source(rows, i)


def _first(b):
    return np.asarray(b[:1, :1], dtype=np.float64)


def _block_sum(a):
    return np.asarray([[a.sum(dtype=np.float32)]], dtype=np.float64)


def _worker_counters(dask_worker=None):
    ru = resource.getrusage(resource.RUSAGE_SELF)
    limit = getattr(getattr(dask_worker, "memory_manager", None), "memory_limit", None) or 0
    spilled = len(getattr(getattr(dask_worker, "data", None), "slow", ()) or ())
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    return {"cpu": time.process_time(), "minflt": ru.ru_minflt, "maxrss": ru.ru_maxrss << 10,
            "rss": rss, "limit": limit, "spilled": spilled}


# ---------------------------------------------------------------------------------------------
def _best_round(fns, repeat):
    """Best over ``repeat`` rounds of the time of one call of each of ``fns`` in turn, and the
    minor page faults of that round."""
    best, flt = float("inf"), 0
    for _ in range(repeat):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for f in fns:
            f()
        t = time.perf_counter() - t
        if t < best:
            best, flt = t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return best, flt


def _in_process(sources, rows, repeat):
    """Per-chunk seconds of the in-process references, all threads and 1 thread."""
    from threadpoolctl import threadpool_limits

    import normffn
    from normffn.batch_norm import partial_stats

    xs = [_source(rows, i) for i in range(sources)]
    out = np.empty_like(xs[0])
    w, b = np.ones(D, np.float32), np.zeros(D, np.float32)
    try:
        from normffn._kernels import _bench

        def copy(x):
            _bench.parallel_copy(out.reshape(-1).view(np.uint8), x.reshape(-1).view(np.uint8))
    except (ImportError, AttributeError):
        def copy(x):
            np.copyto(out, x)
    pool = ThreadPoolExecutor(2)

    def sum2(x):  # np.sum is single-threaded: two halves on two threads
        h = x.shape[0] // 2
        list(pool.map(lambda a: a.sum(dtype=np.float32), (x[:h], x[h:])))

    cases = {
        "ln_alloc": lambda x: normffn.layer_norm(x, D, w, b),
        "ln_out": lambda x: normffn.layer_norm(x, D, w, b, out=out),
        "copy": copy,
        "bn_stats": partial_stats,
        "sum": lambda x: x.sum(dtype=np.float32),
        "sum_2threads": sum2,
    }
    res = {}
    for threads in ("all", 1):
        with threadpool_limits(None if threads == "all" else 1):
            for name, fn in cases.items():
                if threads == 1 and name == "sum_2threads":
                    continue
                calls = [lambda x=x: fn(x) for x in xs]
                fn(xs[0])
                t, flt = _best_round(calls, repeat)
                res[f"{name}@{threads}"] = (t / sources, flt / sources)
    pool.shutdown()
    return res


def _cluster(me, graphs, env, config, repeat, rows, sources):
    """Compute each graph on a fresh LocalCluster (2 workers x 1 thread; ``env`` added to the
    workers' start environment, ``config`` to dask's): the best wall time of ``repeat`` runs
    after a warm-up and that run's counters; the task stream (and wall time) of one more run,
    recorded apart so its bookkeeping is not timed; the workers' final counters."""
    import dask
    from distributed import Client, LocalCluster, get_task_stream

    base = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    saved = dict(os.environ)  # the nanny writes its settings into this process's environment
    res, streams, counters = {}, {}, {}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {**base, **env},
                              **config}), \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                             dashboard_address=None) as cluster, Client(cluster) as client:
            client.upload_file(_HERE)
            client.run(me._make_sources, rows, sources)  # before any timing
            for name, g in graphs.items():
                client.compute(g, sync=True)          # warm the kernels and the allocators
                best = float("inf")
                for _ in range(repeat):
                    c0 = client.run(me._worker_counters)
                    own = time.process_time()   # this process: client and scheduler
                    t = time.perf_counter()
                    client.compute(g, sync=True)
                    t = time.perf_counter() - t
                    own = time.process_time() - own
                    c1 = client.run(me._worker_counters)
                    if t < best:
                        best, counters[name] = t, (c0, c1, own)
                res[name] = best
                with get_task_stream(client) as ts:   # task times: one more, untimed run
                    t = time.perf_counter()
                    client.compute(g, sync=True)
                    streams[name] = (ts.data, time.perf_counter() - t)
            final = client.run(me._worker_counters)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return res, streams, counters, final


def main() -> int:
    import dask
    import dask.array as da

    import normffn.dask as nd

    # tasks must call this file's functions by reference (a function of __main__ would be
    # pickled by value, with a fresh, empty chunk cache in every task)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dask_scale as me

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8.0, help="size of x in GiB (default 8)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk-mib", type=float, default=64.0,
                   help="chunk size in MiB (default 64, the issue's)")
    p.add_argument("--sources", type=int, default=8,
                   help="distinct 64 MiB source chunks per process (default 8)")
    p.add_argument("--normffn-threads", type=int, default=None,
                   help="set dask config normffn.threads (default: each task's share; 2 "
                        "reproduces the oversubscription fixed in session 5)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    t_start = time.perf_counter()
    chunk_bytes = int(args.chunk_mib * (1 << 20)) if args.chunk_mib else CHUNK_BYTES
    rows_per_chunk = max(1, chunk_bytes // (D * 4))
    nchunks = max(1, int(round(args.gib * (1 << 30) / (rows_per_chunk * D * 4))))
    rows = rows_per_chunk * nchunks
    nbytes = rows * D * 4
    cb = rows_per_chunk * D * 4
    sources = max(1, min(args.sources, nchunks))
    w = np.ones(D, np.float32)
    b = np.zeros(D, np.float32)

    inproc = _in_process(sources, rows_per_chunk, max(args.repeat, 3))
    me._CACHE.clear()  # the in-process sources are not needed while the clusters run

    one = ((1,) * nchunks, (1,))
    x = da.map_blocks(me._chunk, rows=rows_per_chunk, sources=sources, dtype=np.float32,
                      chunks=((rows_per_chunk,) * nchunks, (D,)))
    dask.config.set({"normffn.threads": args.normffn_threads})  # read when graphs are built
    graphs = {
        "noop": x.map_blocks(me._first, chunks=one, dtype=np.float64).sum(),
        "ln": nd.layer_norm(x, D, w, b).map_blocks(me._first, chunks=one,
                                                   dtype=np.float64).sum(),
        "bn": nd._batch_norm.batch_statistics(x),
        "read_sum": x.map_blocks(me._block_sum, chunks=one, dtype=np.float64).sum(),
    }
    cluster_res, streams, counters, final = _cluster(me, graphs, {}, {}, args.repeat,
                                                     rows_per_chunk, sources)
    # again on a cluster set up against fresh pages and per-task round trips (see the top)
    tuned_env = {"MALLOC_ARENA_MAX": 1, "MALLOC_MMAP_THRESHOLD_": 4 * cb,
                 "MALLOC_TRIM_THRESHOLD_": 64 * cb}
    tuned_config = {"distributed.scheduler.worker-saturation": float("inf")}
    res2, streams2, counters2, final2 = _cluster(
        me, {k: graphs[k] for k in ("ln", "bn", "noop")}, tuned_env, tuned_config, args.repeat,
        rows_per_chunk, sources)
    for k in res2:
        cluster_res[k + "_tuned"], streams[k + "_tuned"] = res2[k], streams2[k]
        counters[k + "_tuned"] = counters2[k]
    # the in-process references again: the better of the two measurements counts
    again = _in_process(sources, rows_per_chunk, max(args.repeat, 3))
    inproc = {k: min(v, again[k]) for k, v in inproc.items()}
    me._CACHE.clear()

    def gbs(bytes_, seconds):
        return bytes_ / seconds / 1e9

    def per_chunk_task_ms(name):
        """Mean compute time of the per-chunk tasks (those with one key per chunk)."""
        by = {}
        data, wall = streams[name]
        for r in data:
            k = r["key"]
            prefix = k[0] if isinstance(k, tuple) else k
            dur = sum(s["stop"] - s["start"] for s in r["startstops"] if s["action"] == "compute")
            by.setdefault(prefix, []).append(dur)
        chunk_tasks = [v for v in by.values() if len(v) == nchunks]
        busy = sum(sum(v) for v in by.values())
        return (1e3 * float(np.mean(chunk_tasks[0])) if chunk_tasks else float("nan"),
                busy / (2 * wall))

    r = {"gib": nbytes / (1 << 30), "chunks": nchunks, "sources_per_process": sources}
    ip = {k: v[0] for k, v in inproc.items()}
    r["copy_GBps"] = gbs(2 * cb, ip["copy@all"])
    r["copy_one_read_GBps"] = gbs(cb, ip["copy@all"])
    r["copy_1thread_GBps"] = gbs(2 * cb, ip["copy@1"])
    r["ln_inprocess_GBps"] = gbs(2 * cb, ip["ln_alloc@all"])
    r["ln_inprocess_out_GBps"] = gbs(2 * cb, ip["ln_out@all"])
    r["ln_inprocess_1thread_GBps"] = gbs(2 * cb, ip["ln_alloc@1"])
    r["ln_inprocess_1thread_out_GBps"] = gbs(2 * cb, ip["ln_out@1"])
    r["ln_fresh_output_faults_per_chunk"] = inproc["ln_alloc@1"][1]
    r["bn_inprocess_GBps"] = gbs(cb, ip["bn_stats@all"])
    r["bn_inprocess_1thread_GBps"] = gbs(cb, ip["bn_stats@1"])
    r["sum_inprocess_2threads_GBps"] = gbs(cb, ip["sum_2threads@all"])
    r["sum_inprocess_1thread_GBps"] = gbs(cb, ip["sum@1"])
    r["ln_cluster_GBps"] = gbs(2 * nbytes, cluster_res["ln"])
    r["ln_tuned_cluster_GBps"] = gbs(2 * nbytes, cluster_res["ln_tuned"])
    r["bn_cluster_GBps"] = gbs(nbytes, cluster_res["bn"])
    r["bn_tuned_cluster_GBps"] = gbs(nbytes, cluster_res["bn_tuned"])
    r["read_sum_cluster_GBps"] = gbs(nbytes, cluster_res["read_sum"])
    r["noop_cluster_chunks_per_s"] = nchunks / cluster_res["noop"]
    # Dask's cost per chunk, in worker-slot time: the no-op graph's wall time x 2 workers
    slot = 2 * cluster_res["noop"] / nchunks
    r["dask_slot_ms_per_chunk"] = 1e3 * slot
    r["dask_tuned_slot_ms_per_chunk"] = 1e3 * 2 * cluster_res["noop_tuned"] / nchunks
    # the targets
    r["ln_vs_inprocess"] = r["ln_cluster_GBps"] / r["ln_inprocess_GBps"]
    # both sides without fresh pages: reused worker memory against in-process out=
    r["ln_tuned_vs_inprocess_out"] = r["ln_tuned_cluster_GBps"] / r["ln_inprocess_out_GBps"]
    r["ln_tuned_vs_inprocess"] = r["ln_tuned_cluster_GBps"] / r["ln_inprocess_GBps"]
    r["bn_vs_copy_one_read"] = r["bn_cluster_GBps"] / r["copy_one_read_GBps"]
    r["bn_tuned_vs_copy_one_read"] = r["bn_tuned_cluster_GBps"] / r["copy_one_read_GBps"]
    # the floors
    r["read_sum_vs_inprocess_sum"] = (r["read_sum_cluster_GBps"]
                                      / r["sum_inprocess_2threads_GBps"])
    r["read_sum_vs_copy_one_read"] = r["read_sum_cluster_GBps"] / r["copy_one_read_GBps"]
    r["ln_vs_2x_inprocess_1thread"] = r["ln_cluster_GBps"] / (2 * r["ln_inprocess_1thread_GBps"])
    r["bn_vs_2x_inprocess_1thread"] = r["bn_cluster_GBps"] / (2 * r["bn_inprocess_1thread_GBps"])
    # what 2 single-thread workers can reach if each chunk costs its in-process 1-thread call
    # plus Dask's per-chunk cost (both measured above), as a share of each target's baseline
    r["ln_ceiling_vs_inprocess"] = (gbs(2 * 2 * cb, ip["ln_alloc@1"] + slot)
                                    / r["ln_inprocess_GBps"])
    r["bn_ceiling_vs_copy_one_read"] = (gbs(2 * cb, ip["bn_stats@1"] + slot)
                                        / r["copy_one_read_GBps"])
    for name in ("ln", "ln_tuned", "bn", "bn_tuned", "read_sum", "noop", "noop_tuned"):
        task_ms, busy = per_chunk_task_ms(name)
        c0, c1, own = counters[name]
        r[f"{name}_task_ms"] = task_ms
        r[f"{name}_client_scheduler_cpu_ms_per_chunk"] = 1e3 * own / nchunks
        r[f"{name}_workers_busy"] = busy
        r[f"{name}_worker_cpu_ms_per_chunk"] = 1e3 * sum(
            c1[k]["cpu"] - c0[k]["cpu"] for k in c1) / nchunks
        r[f"{name}_worker_faults_per_chunk"] = sum(
            c1[k]["minflt"] - c0[k]["minflt"] for k in c1) / nchunks
    # the rate if CPU time were the only limit: all CPU spent per chunk (workers, client and
    # scheduler) over the 2 cores; less sensitive to other load on the machine than wall time
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    for name, per_chunk in (("ln", 2 * cb), ("ln_tuned", 2 * cb), ("bn", cb),
                            ("bn_tuned", cb), ("read_sum", cb)):
        cpu = 1e-3 * (r[f"{name}_worker_cpu_ms_per_chunk"]
                      + r[f"{name}_client_scheduler_cpu_ms_per_chunk"])
        r[f"{name}_cpu_bound_GBps"] = gbs(per_chunk, cpu / min(cores, 2))
    r["ln_cpu_bound_vs_inprocess"] = r["ln_cpu_bound_GBps"] / r["ln_inprocess_GBps"]
    r["ln_tuned_cpu_bound_vs_inprocess_out"] = (r["ln_tuned_cpu_bound_GBps"]
                                                / r["ln_inprocess_out_GBps"])
    r["bn_cpu_bound_vs_copy_one_read"] = r["bn_cpu_bound_GBps"] / r["copy_one_read_GBps"]
    r["bn_tuned_cpu_bound_vs_copy_one_read"] = (r["bn_tuned_cpu_bound_GBps"]
                                                / r["copy_one_read_GBps"])
    r["ln_inprocess_1thread_ms"] = 1e3 * ip["ln_alloc@1"]
    r["bn_inprocess_1thread_ms"] = 1e3 * ip["bn_stats@1"]
    r["sum_inprocess_1thread_ms"] = 1e3 * ip["sum@1"]
    r["worker_peak_rss_MiB"] = max(v["maxrss"] for v in final.values()) / (1 << 20)
    r["worker_final_rss_MiB"] = max(v["rss"] for v in final.values()) / (1 << 20)
    r["tuned_worker_peak_rss_MiB"] = max(v["maxrss"] for v in final2.values()) / (1 << 20)
    r["worker_sources_MiB"] = sources * cb / (1 << 20)
    r["worker_memory_limit_MiB"] = min(v["limit"] for v in final.values()) / (1 << 20)
    r["worker_spilled_keys"] = sum(v["spilled"] for v in final.values())
    r["seconds_total"] = time.perf_counter() - t_start
    try:
        r["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    _print(r, nbytes, rows, nchunks, sources, cb)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


def _print(r, nbytes, rows, nchunks, sources, cb):
    pct = lambda v: f"{100 * v:5.1f}%"  # noqa: E731
    print(f"x: {nbytes / (1 << 30):.2f} GiB float32 ({rows} x {D}), {nchunks} chunks of "
          f"{cb / (1 << 20):g} MiB "
          f"(block i = source i % {sources}); LocalCluster 2 workers x 1 thread; "
          f"took {r['seconds_total']:.0f} s, load {r.get('loadavg_1min', float('nan')):.2f}")
    print("\nin-process, per chunk (GB/s: LayerNorm and copy count read + write, the rest read)")
    print(f"  copy                       all threads {r['copy_GBps']:6.2f}   1 thread "
          f"{r['copy_1thread_GBps']:6.2f}   (one read: {r['copy_one_read_GBps']:.2f})")
    print(f"  layer_norm (fresh output)  all threads {r['ln_inprocess_GBps']:6.2f}   1 thread "
          f"{r['ln_inprocess_1thread_GBps']:6.2f}   ({r['ln_inprocess_1thread_ms']:.1f} ms, "
          f"{r['ln_fresh_output_faults_per_chunk']:.0f} page faults per chunk)")
    print(f"  layer_norm (out=)          all threads {r['ln_inprocess_out_GBps']:6.2f}   1 thread "
          f"{r['ln_inprocess_1thread_out_GBps']:6.2f}")
    print(f"  batch statistics           all threads {r['bn_inprocess_GBps']:6.2f}   1 thread "
          f"{r['bn_inprocess_1thread_GBps']:6.2f}   ({r['bn_inprocess_1thread_ms']:.1f} ms)")
    print(f"  np.sum                     2 threads   {r['sum_inprocess_2threads_GBps']:6.2f}   "
          f"1 thread {r['sum_inprocess_1thread_GBps']:6.2f}   "
          f"({r['sum_inprocess_1thread_ms']:.1f} ms)")
    print("\ncluster (2 workers x 1 thread)")
    print(f"  {'graph':10s} {'GB/s':>6s} {'task ms':>8s} {'busy':>6s} {'cpu ms/chunk':>12s} "
          f"{'+client/sched':>13s} {'faults/chunk':>12s} {'cpu-bound GB/s':>14s}")
    for name, v in (("ln", r["ln_cluster_GBps"]), ("ln_tuned", r["ln_tuned_cluster_GBps"]),
                    ("bn", r["bn_cluster_GBps"]), ("bn_tuned", r["bn_tuned_cluster_GBps"]),
                    ("read_sum", r["read_sum_cluster_GBps"]), ("noop", float("nan")),
                    ("noop_tuned", float("nan"))):
        print(f"  {name:10s} {v:6.2f} {r[name + '_task_ms']:8.2f} "
              f"{pct(r[name + '_workers_busy']):>6s} "
              f"{r[name + '_worker_cpu_ms_per_chunk']:12.2f} "
              f"{r[name + '_client_scheduler_cpu_ms_per_chunk']:13.2f} "
              f"{r[name + '_worker_faults_per_chunk']:12.1f} "
              f"{r.get(name + '_cpu_bound_GBps', float('nan')):14.2f}")
    print(f"  noop: {r['noop_cluster_chunks_per_s']:.0f} chunks/s = "
          f"{r['dask_slot_ms_per_chunk']:.2f} ms of a worker per chunk (Dask's own cost); "
          f"tuned: {r['dask_tuned_slot_ms_per_chunk']:.2f} ms")
    print("\ntargets")
    print(f"  LayerNorm vs in-process calls (all threads)  {pct(r['ln_vs_inprocess'])}"
          f"   (target >= 60%; cpu-bound {pct(r['ln_cpu_bound_vs_inprocess'])})")
    print(f"  BN statistics vs copy, one read              {pct(r['bn_vs_copy_one_read'])}"
          f"   (target >= 60%; cpu-bound {pct(r['bn_cpu_bound_vs_copy_one_read'])})")
    print(f"  tuned BN statistics vs copy, one read        "
          f"{pct(r['bn_tuned_vs_copy_one_read'])}   (cpu-bound "
          f"{pct(r['bn_tuned_cpu_bound_vs_copy_one_read'])})")
    print(f"  tuned LayerNorm vs in-process out= "
          f"{pct(r['ln_tuned_vs_inprocess_out'])}; vs in-process calls "
          f"{pct(r['ln_tuned_vs_inprocess'])} (cpu-bound vs out= "
          f"{pct(r['ln_tuned_cpu_bound_vs_inprocess_out'])})")
    print("floors (Dask's, measured in this run)")
    print(f"  plain Dask read-and-sum vs in-process np.sum on 2 threads "
          f"{pct(r['read_sum_vs_inprocess_sum'])}; vs copy, one read "
          f"{pct(r['read_sum_vs_copy_one_read'])}")
    print(f"  LayerNorm vs 2 x the in-process 1-thread call            "
          f"{pct(r['ln_vs_2x_inprocess_1thread'])}")
    print(f"  BN statistics vs 2 x the in-process 1-thread call        "
          f"{pct(r['bn_vs_2x_inprocess_1thread'])}")
    print(f"  ceiling from 1-thread calls + Dask's per-chunk cost: LayerNorm "
          f"{pct(r['ln_ceiling_vs_inprocess'])} of in-process, BN statistics "
          f"{pct(r['bn_ceiling_vs_copy_one_read'])} of copy (one read)")
    print(f"memory per worker: peak RSS {r['worker_peak_rss_MiB']:.0f} MiB, final "
          f"{r['worker_final_rss_MiB']:.0f} MiB (of which source chunks "
          f"{r['worker_sources_MiB']:.0f} MiB = {sources} chunks); memory limit "
          f"{r['worker_memory_limit_MiB']:.0f} MiB, {r['worker_spilled_keys']} keys spilled; "
          f"tuned workers: peak RSS {r['tuned_worker_peak_rss_MiB']:.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())

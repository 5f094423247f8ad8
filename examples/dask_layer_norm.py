"""LayerNorm (forward + backward) and BatchNorm statistics on a dask array with normffn.dask.

The same script runs on this machine's threads or on a cluster:

    python examples/dask_layer_norm.py                          # local threads
    python examples/dask_layer_norm.py --scheduler tcp://host:8786   # a dask.distributed cluster
    python examples/dask_layer_norm.py --rows 4_000_000 --chunk-rows 65536

Only the graph (and, once per worker, the weights) go to the cluster; each chunk of x is made
where it is used, so nothing of size x crosses the network.  Needs ``pip install ".[dask]"``.
"""
from __future__ import annotations

import argparse

import dask
import dask.array as da
import numpy as np

import normffn.dask as nd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheduler", default=None,
                   help="address of a dask.distributed scheduler (default: local threads)")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--chunk-rows", type=int, default=16_384)
    args = p.parse_args()

    client = None
    if args.scheduler:
        from distributed import Client
        client = Client(args.scheduler)   # becomes the default scheduler for compute()
        print(client)

    d = args.d
    rng = np.random.default_rng(0)
    weight = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(d)).astype(np.float32)

    # x and dy are generated chunk by chunk on the workers
    gen = da.random.default_rng(1)
    x = gen.standard_normal((args.rows, d), chunks=(args.chunk_rows, d), dtype=np.float32)
    dy = gen.standard_normal((args.rows, d), chunks=(args.chunk_rows, d), dtype=np.float32)

    y, ctx = nd.layer_norm_forward(x, d, weight, bias)
    dx, dweight, dbias = nd.layer_norm_backward(dy, ctx)
    # one pass computes everything: y and dx are reduced to small summaries on the workers,
    # dweight/dbias are tree sums of per-chunk partials (d floats per chunk cross the network)
    y_std, dx_abs, dweight, dbias = dask.compute(y.std(), abs(dx).mean(), dweight, dbias)
    print(f"LayerNorm over {args.rows} x {d}: std(y) = {y_std:.4f}, mean|dx| = {dx_abs:.4g}, "
          f"|dweight| = {np.linalg.norm(dweight):.4g}, |dbias| = {np.linalg.norm(dbias):.4g}")

    # BatchNorm training statistics over the rows (as (N, C)): exact global mean/var, merged
    # from per-chunk (count, mean, M2) — 3 floats per channel per chunk cross the network
    running_mean, running_var = np.zeros(d, np.float32), np.ones(d, np.float32)
    yb = nd.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    print(f"BatchNorm: running_mean[:3] = {running_mean[:3]}, running_var[:3] = "
          f"{running_var[:3]} (y is lazy: {yb.npartitions} chunks)")
    if client is not None:
        client.close()


if __name__ == "__main__":
    main()

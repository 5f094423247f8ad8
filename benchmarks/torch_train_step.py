"""normffn.torch in PyTorch training (issue #14, Performance): a script, not in the asv suite.

Three measurements, float32, every provider in its OWN process (torch and normffn each load an
OpenMP runtime; in one process their spinning workers distort both).  ``main`` spawns
``python benchmarks/torch_train_step.py --worker <case>`` subprocesses, alternating the cases
process by process over ``--rounds`` rounds (the order is reversed on every other round), and
prints the median over rounds of each process's median, ± half the range over rounds, and the
ratios the issue asks for.

1. ``train``: a training step of a small MLP-style model, 4 × pre-LN FFN sublayer
   ``x + fc2(relu(fc1(LayerNorm(x))))`` (d=512, h=2048, 2048 tokens per step), loss = MSE to a
   fixed target, ``SGD(lr=1e-3)``; one step = forward, backward, ``optimizer.step()``,
   ``optimizer.zero_grad()``.  Cases: ``stock`` (plain eager nn.LayerNorm + nn.Linear + nn.ReLU
   + nn.Linear + residual), ``normffn`` (the same model of ``normffn.torch.FFNBlock`` modules,
   the fused sublayer; loads the stock state dict), ``compiled`` (``torch.compile`` of the stock
   model, default mode: compiled once, then 3 warm-up steps before timing).  With ``--patched``
   also ``patched``: the stock model after ``normffn.torch.patch`` with its MLP as
   ``normffn.torch.FeedForward``.  Every process builds the model from the same seed; a separate
   ``check`` process builds stock and normffn from the same weights and prints the relative
   difference of their losses (step 0 and a few SGD steps).  Targets: normffn ≥ 1.25× faster
   than stock, and not slower than compiled.  Case ``gemms``: only the step's 24 GEMMs
   (torch.mm into preallocated outputs, torch's BLAS) — the floor of any step multiplying with
   that BLAS; stock's step over it is the most a fused implementation can gain.
2. ``overhead``: per-call cost at small shapes (1, 4, 64 rows × 768) of
   ``normffn.torch.layer_norm`` vs ``torch.nn.functional.layer_norm``, forward without autograd
   and with it (input, weight and bias require grad; the graph is built and dropped), and of the
   NumPy ``normffn.layer_norm`` on the same shape (kernel + argument checks, no wrapper; in a
   process without torch).  µs per call = best of several repeats of a timeit loop.  The
   wrapper's overhead is ``normffn.torch − numpy``.  Target: ≤ 15 µs.
3. ``ffn``: an FFN training loop at 8192×512×2048 (ReLU): ``normffn.torch.FeedForward``
   forward + backward (x requires grad; the module reuses its buffers across steps; grads set to
   None after each step) vs the bare GEMMs of one step (x·W1, h·W2 forward; dy·W2ᵀ, dH·W1ᵀ,
   hᵀ·dy, xᵀ·dH backward) into preallocated outputs, timed twice: with ``torch.mm(out=)``
   (torch's BLAS: MKL on x86) and with ``scipy.linalg.blas.sgemm`` on Fortran-ordered views,
   ``overwrite_c`` (scipy's OpenBLAS — the BLAS normffn's kernels call).  normffn's rate is
   reported as a % of both.  Target: ≥ 95% of the bare GEMMs' rate.

4. ``fused`` (issues #12 and #13 on one BLAS): normffn.torch's fused FFN (SwiGLU at the gated
   issue's shapes) and LayerNorm sublayer (pre-LN and post-LN, ReLU and SwiGLU) against the
   same computation in PyTorch eager and against its six bare GEMMs, every case on torch's BLAS,
   so the speed-up is the fusion's alone (``python -m normffn bench`` compares normffn's NumPy
   API on scipy's OpenBLAS with torch on MKL: BLAS against BLAS on this machine).

Usage (from the repository root; normffn from ``src`` unless installed)::

    PYTHONPATH=src python benchmarks/torch_train_step.py                  # all, 3 rounds
    PYTHONPATH=src python benchmarks/torch_train_step.py --only train --rounds 5 --json out.json
    PYTHONPATH=src python benchmarks/torch_train_step.py --tiny --rounds 1  # smoke test

Options: ``--rounds N`` (3), ``--steps N`` (timed steps per process for train and ffn; 10),
``--only {train,overhead,ffn,fused}``, ``--threads N`` (2: OMP/OpenBLAS/MKL and torch threads
of every worker), ``--omp-wait-policy {passive,active}`` (sets ``OMP_WAIT_POLICY`` in every worker,
stock PyTorch's too; default: left as the environment has it), ``--patched``, ``--json FILE``,
``--tiny`` (small sizes, for a smoke test only).

Why the wait policy is an option: in a process with torch, normffn's kernels run on torch's
libgomp (one OpenMP runtime, one pool).  While normffn.torch's GEMMs ran on scipy's OpenBLAS,
libgomp's idle workers spun while OpenBLAS's threads ran the next GEMM on the same cores, and
passive workers closed most of that gap (docs/tuning.md, "normffn.torch in a training step");
now that normffn.torch multiplies with torch's BLAS on the same pool, the option is there to
check that it no longer matters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
RESULT = "TORCH-TRAIN-STEP-RESULT "

FULL = {"d": 512, "h": 2048, "tokens": 2048, "layers": 4,
        "ffn": (8192, 512, 2048), "ln_shapes": [(1, 768), (4, 768), (64, 768)],
        "fused": ["ffn/swiglu/2048x768x2048", "ffn/swiglu/8192x512x1376",
                  "pre/relu/2048x768x3072", "post/relu/2048x768x3072",
                  "pre/swiglu/2048x768x2048", "post/swiglu/2048x768x2048"]}
TINY = {"d": 64, "h": 256, "tokens": 128, "layers": 4,
        "ffn": (256, 64, 256), "ln_shapes": [(1, 768), (4, 768), (64, 768)],
        "fused": ["ffn/swiglu/256x64x128", "pre/relu/256x64x256", "post/swiglu/256x64x128"]}
LR = 1e-3
TRAIN_WARMUP = 3
FFN_WARMUP = 3
CHECK_STEPS = 3

CASES = {
    "train": ["train-stock", "train-normffn", "train-compiled", "train-gemms"],
    "overhead": ["overhead-torch", "overhead-normffn", "overhead-numpy"],
    "ffn": ["ffn-normffn", "ffn-torchmm", "ffn-sgemm"],
    "fused": [],          # filled from the sizes' "fused" list: fused-<kind>@<spec>
}
FUSED_KINDS = ("torch", "normffn", "module", "gemms")


# ======================================================================= worker side
def _torch(threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    return torch


def _no_fallbacks():
    """A normffn.torch fallback to PyTorch would time the wrong thing: make it an error."""
    import warnings

    import normffn.torch as nft
    warnings.simplefilter("error", nft.FallbackWarning)
    return nft


def _stock_model(torch, cfg):
    from torch import nn

    class StockBlock(nn.Module):
        """Pre-LN FFN sublayer in plain PyTorch; state-dict keys as normffn.torch.FFNBlock."""

        def __init__(self, d, h):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, h)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(h, d)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    return nn.Sequential(*[StockBlock(cfg["d"], cfg["h"]) for _ in range(cfg["layers"])])


def _normffn_model(torch, cfg, stock):
    """FFNBlock modules (the fused sublayer) with the stock model's weights."""
    from torch import nn
    nft = _no_fallbacks()
    if not hasattr(nft, "FFNBlock"):   # older normffn.torch: patch + FeedForward
        return _patched_model(torch, cfg, stock), "patch + FeedForward (no FFNBlock)"
    model = nn.Sequential(*[nft.FFNBlock(cfg["d"], cfg["h"], "relu", norm="layer",
                                         placement="pre") for _ in range(cfg["layers"])])
    model.load_state_dict(stock.state_dict())
    return model, "FFNBlock"


def _patched_model(torch, cfg, stock):
    """The stock model's structure after normffn.torch.patch (LayerNorm -> normffn LayerNorm),
    with its Linear/ReLU/Linear as normffn.torch.FeedForward; the stock weights."""
    from torch import nn
    nft = _no_fallbacks()

    class PatchedBlock(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.ffn = nft.FeedForward(d, h, "relu")

        def forward(self, x):
            return x + self.ffn(self.norm(x))

    model = nn.Sequential(*[PatchedBlock(cfg["d"], cfg["h"]) for _ in range(cfg["layers"])])
    sd = {k.replace(".fc1.", ".ffn.fc1.").replace(".fc2.", ".ffn.fc2."): v
          for k, v in stock.state_dict().items()}
    model.load_state_dict(sd)
    model = nft.patch(model)
    rep = nft.patch_report(model)
    if rep is not None and (rep.skipped or len(rep.replaced) != cfg["layers"]):
        raise RuntimeError(f"patch did not replace every LayerNorm:\n{rep}")
    return model


def _train_data(torch, cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["tokens"], cfg["d"], generator=g)
    target = torch.randn(cfg["tokens"], cfg["d"], generator=g)
    return x, target


def _train_step_fn(torch, model, x, target):
    import torch.nn.functional as F
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()
    return step


def _time_steps(step, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return ts


def _gemms_step(torch, cfg):
    """The bare GEMMs of one training step of the model: per layer, forward fc1 and fc2, backward
    dH = dy·W2, dx = dH·W1, dW2 = dyᵀ·H, dW1 = dHᵀ·xn, each with torch.mm into a preallocated
    output, the weights in nn.Linear's layout as the Linears pass them: the step's floor for
    any implementation multiplying with torch's BLAS."""
    n, d, h = cfg["tokens"], cfg["d"], cfg["h"]
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(cfg["layers"]):
        layers.append({"x": torch.randn(n, d, generator=g), "dy": torch.randn(n, d, generator=g),
                       "w1": torch.randn(h, d, generator=g), "w2": torch.randn(d, h, generator=g),
                       "H": torch.empty(n, h), "Y": torch.empty(n, d), "dH": torch.empty(n, h),
                       "dX": torch.empty(n, d), "dW1": torch.empty(h, d),
                       "dW2": torch.empty(d, h)})

    def step():
        for t in layers:
            torch.mm(t["x"], t["w1"].t(), out=t["H"])
            torch.mm(t["H"], t["w2"].t(), out=t["Y"])
        for t in reversed(layers):
            torch.mm(t["dy"], t["w2"], out=t["dH"])
            torch.mm(t["dH"], t["w1"], out=t["dX"])
            torch.mm(t["dy"].t(), t["H"], out=t["dW2"])
            torch.mm(t["dH"].t(), t["x"], out=t["dW1"])
        return None
    return step


def worker_train(kind, cfg, steps, threads):
    torch = _torch(threads)
    if kind == "gemms":
        step = _gemms_step(torch, cfg)
        for _ in range(TRAIN_WARMUP + 1):
            step()
        ts = _time_steps(step, steps)
        return {"samples_s": ts, "median_s": statistics.median(ts), "first_loss": None,
                "first_step_s": 0.0, "route": "its bare GEMMs: torch.mm(out=), torch's BLAS",
                "torch_threads": torch.get_num_threads()}
    stock = _stock_model(torch, cfg)
    route = "plain eager PyTorch"
    if kind == "stock":
        model = stock
    elif kind == "normffn":
        model, route = _normffn_model(torch, cfg, stock)
    elif kind == "patched":
        model, route = _patched_model(torch, cfg, stock), "patch + FeedForward"
    elif kind == "compiled":
        model, route = torch.compile(stock), "torch.compile(stock), default mode"
    else:
        raise SystemExit(f"unknown train case {kind}")
    x, target = _train_data(torch, cfg)
    step = _train_step_fn(torch, model, x, target)
    t = time.perf_counter()
    first_loss = step()                    # step 0 (for compiled: includes the compilation)
    first_s = time.perf_counter() - t
    for _ in range(TRAIN_WARMUP):
        step()
    ts = _time_steps(step, steps)
    return {"samples_s": ts, "median_s": statistics.median(ts), "first_loss": first_loss,
            "first_step_s": first_s, "route": route, "torch_threads": torch.get_num_threads()}


def worker_check(cfg, threads):
    """Stock and normffn from the same weights: losses of CHECK_STEPS SGD steps."""
    torch = _torch(threads)
    stock = _stock_model(torch, cfg)
    model, route = _normffn_model(torch, cfg, stock)
    x, target = _train_data(torch, cfg)
    # the normffn model was loaded from stock's weights above, before either took a step
    s_step = _train_step_fn(torch, stock, x, target)
    n_step = _train_step_fn(torch, model, x, target)
    ls = [s_step() for _ in range(CHECK_STEPS)]
    ln = [n_step() for _ in range(CHECK_STEPS)]
    rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(ls, ln)]
    pmax = 0.0
    for p, q in zip(stock.state_dict().values(), model.state_dict().values()):
        pmax = max(pmax, float((p - q).abs().max() / p.abs().max().clamp_min(1e-30)))
    return {"stock_losses": ls, "normffn_losses": ln, "first_loss_rel_diff": rel[0],
            "max_loss_rel_diff": max(rel), "max_param_rel_diff": pmax, "route": route}


def _best_us(fn, repeat=7, min_time=0.2):
    import timeit
    for _ in range(50):    # warm-up: lazy initialisation, caches
        fn()
    timer = timeit.Timer(fn)
    number, t = timer.autorange()
    number = max(1, int(number * min_time / max(t, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def worker_overhead(kind, cfg, threads):
    out = {}
    if kind == "numpy":
        import numpy as np

        import normffn
        for n, d in cfg["ln_shapes"]:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((n, d), dtype=np.float32)
            w = rng.standard_normal(d, dtype=np.float32)
            b = rng.standard_normal(d, dtype=np.float32)
            out[f"{n}x{d}"] = {"numpy": _best_us(lambda: normffn.layer_norm(x, (d,), w, b))}
        return out
    torch = _torch(threads)
    import torch.nn.functional as F
    if kind == "normffn":
        nft = _no_fallbacks()
        ln = nft.layer_norm
    elif kind == "torch":
        ln = F.layer_norm
    else:
        raise SystemExit(f"unknown overhead case {kind}")
    for n, d in cfg["ln_shapes"]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g)
        w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
        xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
        shape = (d,)
        res = {"no_grad": _best_us(lambda: ln(x, shape, w, b)),
               "autograd": _best_us(lambda: ln(xg, shape, wg, bg))}
        if kind == "normffn":   # sanity: it is the right answer
            ref = F.layer_norm(x, shape, w, b)
            err = float((ln(x, shape, w, b) - ref).abs().max())
            if err > 1e-4:
                raise RuntimeError(f"normffn.torch.layer_norm differs from torch by {err}")
        out[f"{n}x{d}"] = res
    return out


def _ffn_arrays_np(np, n, d, h):
    rng = np.random.default_rng(0)
    f = np.float32
    return {"x": rng.standard_normal((n, d), dtype=f), "w1": rng.standard_normal((d, h), dtype=f),
            "w2": rng.standard_normal((h, d), dtype=f), "dy": rng.standard_normal((n, d), dtype=f),
            "H": np.empty((n, h), f), "Y": np.empty((n, d), f), "dH": np.empty((n, h), f),
            "dX": np.empty((n, d), f), "dW1": np.empty((d, h), f), "dW2": np.empty((h, d), f)}


def worker_ffn(kind, cfg, steps, threads):
    n, d, h = cfg["ffn"]
    flops = 6 * 2.0 * n * d * h
    if kind == "sgemm":
        import numpy as np
        from scipy.linalg.blas import sgemm
        a = _ffn_arrays_np(np, n, d, h)

        def fortran(m):
            """(matrix as BLAS reads it, trans flag) so that op(result) == m, no copy."""
            if m.flags.f_contiguous:
                return m, 0
            if m.flags.c_contiguous:
                return m.T, 1
            raise ValueError("operand is neither C- nor F-contiguous")

        def mm(A, B, C):
            """C (C-ordered) = A @ B, as the Fortran product C.T = B.T @ A.T into C.T."""
            fa, ta = fortran(B.T)
            fb, tb = fortran(A.T)
            r = sgemm(1.0, fa, fb, beta=0.0, c=C.T, trans_a=ta, trans_b=tb, overwrite_c=1)
            if not np.shares_memory(r, C):
                raise RuntimeError("sgemm did not write into the preallocated output")

        x, w1, w2, dy = a["x"], a["w1"], a["w2"], a["dy"]
        H, Y, dH, dX, dW1, dW2 = a["H"], a["Y"], a["dH"], a["dX"], a["dW1"], a["dW2"]

        def step():
            mm(x, w1, H)          # forward
            mm(H, w2, Y)
            mm(dy, w2.T, dH)      # backward
            mm(dH, w1.T, dX)
            mm(H.T, dy, dW2)
            mm(x.T, dH, dW1)
        step()
        k = min(8, n)             # spot check every product on a slice
        for got, want in ((H[:k], x[:k] @ w1), (Y[:k], H[:k] @ w2), (dH[:k], dy[:k] @ w2.T),
                          (dX[:k], dH[:k] @ w1.T), (dW2[:k], H[:, :k].T @ dy),
                          (dW1[:k], x[:, :k].T @ dH)):
            if not np.allclose(got, want, rtol=1e-3, atol=1e-2 * float(np.abs(want).max())):
                raise RuntimeError("scipy sgemm spot check failed")
        label = "scipy.linalg.blas.sgemm (scipy's OpenBLAS)"
    else:
        torch = _torch(threads)
        g = torch.Generator().manual_seed(0)
        if kind == "torchmm":
            x, dy = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
            w1, w2 = torch.randn(d, h, generator=g), torch.randn(h, d, generator=g)
            H, Y, dH = torch.empty(n, h), torch.empty(n, d), torch.empty(n, h)
            dX, dW1, dW2 = torch.empty(n, d), torch.empty(d, h), torch.empty(h, d)

            def step():
                torch.mm(x, w1, out=H)
                torch.mm(H, w2, out=Y)
                torch.mm(dy, w2.t(), out=dH)
                torch.mm(dH, w1.t(), out=dX)
                torch.mm(H.t(), dy, out=dW2)
                torch.mm(x.t(), dH, out=dW1)
            label = "torch.mm(out=) (torch's BLAS%s)" % (
                ": MKL" if torch.backends.mkl.is_available() else "")
        elif kind == "normffn":
            nft = _no_fallbacks()
            torch.manual_seed(0)
            ff = nft.FeedForward(d, h, "relu")
            x = torch.randn(n, d, generator=g).requires_grad_(True)
            dy = torch.randn(n, d, generator=g)

            def step():
                y = ff(x)
                y.backward(dy)
                x.grad = None
                ff.zero_grad(set_to_none=True)
            label = "normffn.torch.FeedForward fwd+bwd"
        else:
            raise SystemExit(f"unknown ffn case {kind}")
    for _ in range(FFN_WARMUP):
        step()
    ts = _time_steps(step, steps)
    med = statistics.median(ts)
    return {"samples_s": ts, "median_s": med, "gflops": flops / med / 1e9, "label": label}


def worker_fused(kind, spec, steps, threads):
    """One ``spec`` ("ffn/<act>/NxDxH", or "<pre|post>/<act>/NxDxH" for the LayerNorm
    sublayer) fwd+bwd with autograd (x and every parameter require grad): ``torch`` eager
    (F.layer_norm, F.linear, the activation — gated: chunk, silu(gate) * up — F.linear, the
    residual add), ``normffn`` (normffn.torch.ffn / ffn_block: the fused kernels, torch's BLAS),
    ``module`` (normffn.torch.FeedForward / FFNBlock, which reuse their output, hidden and
    gradient buffers from step to step: no fresh memory to page-fault), or ``gemms``: the six
    GEMMs of the FFN's forward and backward alone (torch.mm(out=))."""
    import torch.nn.functional as F
    torch = _torch(threads)
    place, act, shape = spec.split("/")
    n, d, h = (int(v) for v in shape.split("x"))
    gated = act in ("swiglu", "geglu", "reglu")
    hw = 2 * h if gated else h
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_(True)
    dy = torch.randn(n, d, generator=g)
    W1 = (torch.randn(hw, d, generator=g) / d ** 0.5).requires_grad_(True)
    W2 = (torch.randn(d, h, generator=g) / h ** 0.5).requires_grad_(True)
    b1 = torch.zeros(hw, requires_grad=True)
    b2 = torch.zeros(d, requires_grad=True)
    nw = torch.ones(d, requires_grad=True)
    nb = torch.zeros(d, requires_grad=True)
    leaves = (x, W1, b1, W2, b2, nw, nb)

    def torch_ffn(v):
        z = F.linear(v, W1, b1)
        if gated:
            gate, up = z.chunk(2, dim=-1)
            a = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}[act](gate) * up
        else:
            a = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z)
        return F.linear(a, W2, b2)

    if kind == "gemms":
        Z, A, Y = torch.empty(n, hw), torch.empty(n, h), torch.empty(n, d)
        dA, dZ, dX = torch.empty(n, h), torch.empty(n, hw), torch.empty(n, d)
        dW1, dW2 = torch.empty(hw, d), torch.empty(d, h)
        xv, w1, w2 = x.detach(), W1.detach(), W2.detach()

        def step():
            torch.mm(xv, w1.t(), out=Z)
            torch.mm(A, w2.t(), out=Y)
            torch.mm(dy, w2, out=dA)
            torch.mm(dZ, w1, out=dX)
            torch.mm(dy.t(), A, out=dW2)
            torch.mm(dZ.t(), xv, out=dW1)
    else:
        if kind == "torch":
            if place == "ffn":
                def fn():
                    return torch_ffn(x)
            elif place == "pre":
                def fn():
                    return x + torch_ffn(F.layer_norm(x, (d,), nw, nb))
            else:
                def fn():
                    return F.layer_norm(x + torch_ffn(x), (d,), nw, nb)
        elif kind == "normffn":
            nft = _no_fallbacks()
            if place == "ffn":
                def fn():
                    return nft.ffn(x, W1, b1, W2, b2, act)
            else:
                def fn():
                    return nft.ffn_block(x, nw, nb, W1, b1, W2, b2, act, norm="layer",
                                         placement=place)
        elif kind == "module":
            nft = _no_fallbacks()
            torch.manual_seed(0)
            mod = (nft.FeedForward(d, h, act) if place == "ffn" else
                   nft.FFNBlock(d, h, act, norm="layer", placement=place))
            leaves = (x,) + tuple(mod.parameters())

            def fn():
                return mod(x)
        else:
            raise SystemExit(f"unknown fused case {kind}")

        def step():
            fn().backward(dy)
            for t in leaves:
                t.grad = None
    for _ in range(FFN_WARMUP):
        step()
    ts = _time_steps(step, steps)
    return {"samples_s": ts, "median_s": statistics.median(ts)}


def worker_main(case, args) -> dict:
    cfg = TINY if args.tiny else FULL
    group, _, kind = case.partition("-")
    if group == "train":
        if kind == "check":
            return worker_check(cfg, args.threads)
        return worker_train(kind, cfg, args.steps, args.threads)
    if group == "overhead":
        return worker_overhead(kind, cfg, args.threads)
    if group == "ffn":
        return worker_ffn(kind, cfg, args.steps, args.threads)
    if group == "fused":
        kind, _, spec = kind.partition("@")
        return worker_fused(kind, spec, args.steps, args.threads)
    raise SystemExit(f"unknown case {case!r}")


# ======================================================================= parent side
def _env(threads, wait_policy=None):
    env = dict(os.environ)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    # after the caller's PYTHONPATH: a tree the caller names (an installed normffn, a source
    # tree with built extensions) wins over this checkout's src
    src = os.path.join(REPO, "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    return env


def spawn(case, args):
    cmd = [sys.executable, HERE, "--worker", case, "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=_env(args.threads, args.omp_wait_policy), cwd=REPO)
    wall = time.perf_counter() - t
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    if r.returncode != 0 or not lines:
        print(f"  !! worker {case} failed (exit {r.returncode}):\n{r.stderr[-3000:]}",
              file=sys.stderr)
        return None
    print(f"  {case}: done in {wall:.1f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT):])


def summary(values):
    """median over rounds and ± half the range (0 for one round)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    med = statistics.median(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return {"median": med, "spread": spread, "rounds": values}


def _fmt(s, scale=1.0, unit="", prec=2):
    if s is None:
        return "failed"
    return f"{s['median'] * scale:.{prec}f} ± {s['spread'] * scale:.{prec}f}{unit}"


def _ratio(a, b):
    return None if a is None or b is None else a["median"] / b["median"]


def report_train(runs, check, cfg):
    out = {}
    print(f"\n== 1. training step: {cfg['layers']} × pre-LN FFN sublayer, d={cfg['d']}, "
          f"h={cfg['h']}, {cfg['tokens']} tokens, ReLU, SGD(lr={LR}), MSE loss")
    if check is not None:
        print(f"sanity: stock vs normffn from the same weights ({check['route']}): first loss "
              f"{check['stock_losses'][0]:.6g} vs {check['normffn_losses'][0]:.6g}, max rel diff "
              f"of the first loss {check['first_loss_rel_diff']:.2e}; over {CHECK_STEPS} SGD "
              f"steps {check['max_loss_rel_diff']:.2e}; params after them "
              f"{check['max_param_rel_diff']:.2e}")
        out["check"] = check
    else:
        print("sanity: the check worker failed")
    firsts = {}
    for case, rs in runs.items():
        kind = case.split("-", 1)[1]
        ok = [r for r in rs if r is not None]
        s = summary([r["median_s"] for r in ok])
        out[kind] = {"seconds_per_step": s,
                     "route": ok[0]["route"] if ok else None,
                     "first_step_s": [r["first_step_s"] for r in ok],
                     "first_loss": [r["first_loss"] for r in ok]}
        if ok and ok[0]["first_loss"] is not None:
            firsts[kind] = ok[0]["first_loss"]
        extra = ""
        if kind == "compiled" and ok:
            first = statistics.median(out[kind]["first_step_s"])
            extra = f"  (first step incl. compile: {first:.1f} s)"
        print(f"  {kind:9s} {_fmt(s, 1e3, ' ms/step', 1):>24s}   [{out[kind]['route']}]{extra}")
    if "stock" in firsts:
        rel = {k: abs(v - firsts["stock"]) / max(abs(firsts["stock"]), 1e-30)
               for k, v in firsts.items() if k != "stock"}
        print("  first loss of each timed process vs stock's (same seed): " +
              ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    med = {k: summary([r["median_s"] for r in rs if r is not None]) for k, rs in
           ((c.split("-", 1)[1], r) for c, r in runs.items())}
    ratios = {}
    for other in ("stock", "compiled"):
        for mine in ("normffn", "patched"):
            r = _ratio(med.get(other), med.get(mine))
            if r is not None and mine in med:
                ratios[f"{other}/{mine}"] = r
                target = "≥ 1.25" if other == "stock" else "≥ 1.00"
                print(f"  speed-up of {mine} over {other}: {r:.3f}×  (target {target})")
    floor = med.get("gemms")
    if floor is not None:
        for other in ("stock", "compiled", "normffn", "patched"):
            if med.get(other) is not None:
                share = floor["median"] / med[other]["median"]
                ratios[f"gemms/{other}"] = share
                print(f"  {other}: its GEMMs are {100 * share:.0f}% of its step")
        r = _ratio(med.get("stock"), floor)
        if r is not None:
            print(f"  the most any implementation multiplying with torch's BLAS can gain over "
                  f"stock: {r:.3f}× (stock's step / its bare GEMMs)")
    out["ratios"] = ratios
    return out


def report_overhead(runs, cfg):
    print("\n== 2. per-call overhead, layer_norm forward, float32 (µs per call, best of 7)")
    per = {c.split("-", 1)[1]: [r for r in rs if r is not None] for c, rs in runs.items()}

    def s(kind, shape, key):
        return summary([r[shape][key] for r in per.get(kind, [])])
    out = {}
    print(f"  {'shape':>7s} {'mode':>8s} {'torch F':>16s} {'normffn.torch':>16s} "
          f"{'numpy normffn':>16s} {'wrapper':>10s}")
    for n, d in cfg["ln_shapes"]:
        shape = f"{n}x{d}"
        npy = s("numpy", shape, "numpy")
        for mode in ("no_grad", "autograd"):
            t, m = s("torch", shape, mode), s("normffn", shape, mode)
            wrap = None if m is None or npy is None else m["median"] - npy["median"]
            out[f"{shape} {mode}"] = {"torch": t, "normffn_torch": m, "numpy_normffn": npy,
                                      "wrapper_us": wrap}
            print(f"  {shape:>7s} {mode:>8s} {_fmt(t):>16s} {_fmt(m):>16s} {_fmt(npy):>16s} "
                  f"{'n/a' if wrap is None else f'{wrap:.2f}':>10s}")
    print("  wrapper = normffn.torch − numpy normffn (target ≤ 15 µs); 'autograd': input, "
          "weight, bias require grad")
    return out


def report_ffn(runs, cfg):
    n, d, h = cfg["ffn"]
    print(f"\n== 3. FFN training loop {n}×{d}×{h} ReLU (fwd+bwd, 6 GEMMs per step)")
    out = {}
    med = {}
    for case, rs in runs.items():
        kind = case.split("-", 1)[1]
        ok = [r for r in rs if r is not None]
        s = summary([r["median_s"] for r in ok])
        med[kind] = s
        gf = None if s is None else 6 * 2.0 * n * d * h / s["median"] / 1e9
        out[kind] = {"ms_per_step": s, "gflops": gf, "label": ok[0]["label"] if ok else None}
        print(f"  {kind:8s} {_fmt(s, 1e3, ' ms/step', 1):>24s}  "
              f"{'' if gf is None else f'{gf:7.1f} GFLOP/s'}  [{out[kind]['label']}]")
    for ref in ("torchmm", "sgemm"):
        r = _ratio(med.get(ref), med.get("normffn"))
        if r is not None:
            out[f"normffn_pct_of_{ref}"] = 100 * r
            print(f"  normffn at {100 * r:.1f}% of the bare GEMMs' rate ({ref})  (target ≥ 95%)")
    return out


def report_fused(runs, cfg):
    print("\n== 4. fused FFN and LayerNorm sublayer vs PyTorch eager, both on torch's BLAS "
          "(fwd+bwd with autograd, ms per step)")
    print(f"  {'case':25s} {'torch eager':>13s} {'normffn.torch':>13s} {'module':>13s} "
          f"{'bare GEMMs':>13s} {'speed-up':>9s} {'% GEMMs':>8s} {'floor':>6s}")
    out = {}
    for spec in cfg["fused"]:
        s = {k: summary([r["median_s"] for r in runs[f"fused-{k}@{spec}"] if r is not None])
             for k in FUSED_KINDS}
        up = _ratio(s["torch"], s["normffn"])
        up_mod = _ratio(s["torch"], s["module"])
        pct = _ratio(s["gemms"], s["normffn"])
        pct_mod = _ratio(s["gemms"], s["module"])
        floor = _ratio(s["torch"], s["gemms"])
        out[spec] = {"ms": s, "speedup_vs_torch": up, "fraction_of_gemms": pct,
                     "module_speedup_vs_torch": up_mod, "module_fraction_of_gemms": pct_mod,
                     "max_speedup_same_blas": floor}

        def f(v, fmt, scale=1):
            return "n/a" if v is None else format(v * scale, fmt)
        print(f"  {spec:25s} {_fmt(s['torch'], 1e3, '', 1):>13s} "
              f"{_fmt(s['normffn'], 1e3, '', 1):>13s} {_fmt(s['module'], 1e3, '', 1):>13s} "
              f"{_fmt(s['gemms'], 1e3, '', 1):>13s} {f(up, '.2f')}/{f(up_mod, '.2f')}× "
              f"{f(pct, '.0f', 100)}/{f(pct_mod, '.0f', 100)}% {f(floor, '.2f'):>5s}×")
    print("  speed-up = torch eager / normffn.torch (functional / module); % GEMMs = bare GEMMs /"
          " normffn.torch (functional / module);\n  floor = torch eager / bare GEMMs (the most "
          "any implementation on this BLAS can gain)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per process (train and ffn; default 10)")
    p.add_argument("--only", choices=sorted(CASES), default=None)
    p.add_argument("--threads", type=int, default=2,
                   help="OMP/OpenBLAS/MKL and torch threads in every worker (default 2; 0: "
                        "leave the environment alone)")
    p.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                   help="OMP_WAIT_POLICY of every worker (default: the environment's)")
    p.add_argument("--patched", action="store_true",
                   help="also time the stock model after patch() with FeedForward MLPs")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--tiny", action="store_true", help="small sizes (smoke test only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = worker_main(args.worker, args)
        sys.stdout.write(RESULT + json.dumps(res) + "\n")
        return 0

    cfg = TINY if args.tiny else FULL
    groups = [args.only] if args.only else list(CASES)
    cases = {g: list(CASES[g]) for g in groups}
    if "fused" in cases:
        cases["fused"] = [f"fused-{k}@{spec}" for spec in cfg["fused"] for k in FUSED_KINDS]
    if args.patched and "train" in cases:
        cases["train"].append("train-patched")
    order = [c for g in groups for c in cases[g]]
    runs = {c: [] for c in order}
    policy = args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY") or "unset"
    print(f"torch_train_step: rounds={args.rounds} steps={args.steps} threads={args.threads}"
          f" OMP_WAIT_POLICY={policy}{' TINY sizes' if args.tiny else ''}; every case in its "
          f"own process", file=sys.stderr)
    load = os.getloadavg()[0]
    print(f"load average (1 min) at start: {load:.2f}", file=sys.stderr)
    if load > 0.5:
        print("WARNING: the machine is busy; with 2-thread OpenMP/BLAS pools a descheduled "
              "worker thread stalls every parallel region (ms-sized, scheduler-tick steps), so "
              "these numbers will not be meaningful", file=sys.stderr)
    check = None
    if "train" in groups:
        check = spawn("train-check", args)
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for c in (order if rnd % 2 == 0 else order[::-1]):
            runs[c].append(spawn(c, args))

    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"},
              "omp_wait_policy": policy,
              "sizes": cfg, "load_avg_start": load, "load_avg_end": os.getloadavg()[0]}
    print(f"every worker: {args.threads or 'default'} threads, OMP_WAIT_POLICY={policy}, "
          f"load average {load:.2f} at start, {result['load_avg_end']:.2f} at the end")
    if "train" in groups:
        result["train"] = report_train({c: runs[c] for c in cases["train"]}, check, cfg)
    if "overhead" in groups:
        result["overhead"] = report_overhead({c: runs[c] for c in cases["overhead"]}, cfg)
    if "ffn" in groups:
        result["ffn"] = report_ffn({c: runs[c] for c in cases["ffn"]}, cfg)
    if "fused" in groups:
        result["fused"] = report_fused({c: runs[c] for c in cases["fused"]}, cfg)
    result["raw"] = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    failed = [c for c, rs in runs.items() if any(r is None for r in rs)]
    if check is None and "train" in groups:
        failed.append("train-check")
    if failed:
        print(f"\nFAILED workers: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""normffn.torch against PyTorch: every op and module (forward, each gradient, running stats,
train/eval), gradcheck, opcheck, torch.compile, patch(), state dicts, zero-copy, fallbacks."""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import normffn  # noqa: E402
import normffn.torch as nft  # noqa: E402
from normffn.torch import _ops, _util  # noqa: E402

DTYPES = [torch.float32, torch.float64]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
GATED = ["swiglu", "geglu", "reglu"]


def tol(dtype):
    return dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


def close(a, b, dtype, what=""):
    torch.testing.assert_close(a, b, **tol(dtype), msg=lambda m: f"{what}: {m}")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def grads_of(fn, inputs, seed=0):
    """(output, gradients of <output, random dy> for the inputs that are not None)."""
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    req = [t for t in inputs if t is not None]
    return y, torch.autograd.grad(y, req, dy)


def compare_op(ours, theirs, inputs, dtype, what):
    """Forward and every gradient of ours vs theirs on copies of the same leaves."""
    y1, g1 = grads_of(ours, leaves(*inputs))
    y2, g2 = grads_of(theirs, leaves(*inputs))
    close(y1, y2, dtype, f"{what} y")
    for i, (a, b) in enumerate(zip(g1, g2)):
        close(a, b, dtype, f"{what} grad {i}")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the one-time fallback warnings afresh."""
    _util._warned.clear()
    yield
    _util._warned.clear()


@pytest.fixture(params=["eager", "dispatcher"])
def route(request, monkeypatch):
    """Run a test through both routes: the direct eager one and torch.ops.normffn.*."""
    monkeypatch.setattr(_util, "EAGER_FAST_PATH", request.param == "eager")
    return request.param


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale + offset


# ---------------------------------------------------------------- LayerNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", [((5, 7), 7), ((2, 3, 4, 6), (4, 6)), ((769,), (769,))])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_torch(dtype, shape, nshape, affine, route):
    ns = (nshape,) if isinstance(nshape, int) else nshape
    x = rand(*shape, dtype=dtype, offset=3.0)
    w = rand(*ns, dtype=dtype, seed=1) if affine != "none" else None
    b = rand(*ns, dtype=dtype, seed=2) if affine == "both" else None
    compare_op(lambda x, w=None, b=None: nft.layer_norm(x, nshape, w, b, 1e-5),
               lambda x, w=None, b=None: F.layer_norm(x, ns, w, b, 1e-5),
               [t for t in (x, w, b) if t is not None] if affine != "none" else [x],
               dtype, f"layer_norm {affine}")


def test_layer_norm_gradcheck(route):
    x, w, b = leaves(rand(3, 5), rand(5, seed=1), rand(5, seed=2))
    assert torch.autograd.gradcheck(lambda x, w, b: nft.layer_norm(x, 5, w, b), (x, w, b))


def test_layer_norm_only_needed_grads(route):
    """x frozen: no dx slot filled; weight frozen: no dweight; autograd gets None for both."""
    x = rand(4, 6)
    w, b = leaves(rand(6, seed=1), rand(6, seed=2))
    y = nft.layer_norm(x, 6, w.detach(), b)
    y.sum().backward()
    assert w.grad is None and b.grad is not None
    close(b.grad, torch.full((6,), 4.0, dtype=torch.float64), torch.float64, "dbias")


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch(dtype, with_weight, eps, route):
    x = rand(3, 4, 10, dtype=dtype)
    ins = [x, rand(10, dtype=dtype, seed=1)] if with_weight else [x]
    with warnings.catch_warnings():
        warnings.simplefilter("error", nft.FallbackWarning)
        compare_op(lambda x, w=None: nft.rms_norm(x, (10,), w, eps),
                   lambda x, w=None: F.rms_norm(x, (10,), w, eps), ins, dtype, "rms_norm")


def test_rms_norm_gradcheck(route):
    x, w = leaves(rand(3, 5), rand(5, seed=1))
    assert torch.autograd.gradcheck(lambda x, w: nft.rms_norm(x, 5, w, 1e-5), (x, w))


# ---------------------------------------------------------------- BatchNorm

def _bn_pair(C, dtype, momentum=0.1):
    return ([torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)],
            [torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_training_matches_torch(dtype, shape, channels_last, route):
    if channels_last and len(shape) < 3:
        pytest.skip("channels-last needs spatial dims")
    C = shape[1]
    ours, theirs = _bn_pair(C, dtype)
    w, b = rand(C, dtype=dtype, seed=1), rand(C, dtype=dtype, seed=2)
    for step in range(3):  # running stats over several steps
        x = rand(*shape, dtype=dtype, seed=10 + step, scale=2.0, offset=1.5)
        if channels_last:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        compare_op(lambda x, w, b: nft.batch_norm(x, *ours, w, b, True, 0.1, 1e-5),
                   lambda x, w, b: F.batch_norm(x, *theirs, w, b, True, 0.1, 1e-5),
                   [x, w, b], dtype, f"bn step {step}")
    # compare_op runs each forward twice per step (leaves for ours, leaves for theirs): same
    # number of updates on both sides
    close(ours[0], theirs[0], dtype, "running_mean")
    close(ours[1], theirs[1], dtype, "running_var")
    # eval with the running stats
    x = rand(*shape, dtype=dtype, seed=99)
    compare_op(lambda x, w, b: nft.batch_norm(x, *ours, w, b, False),
               lambda x, w, b: F.batch_norm(x, *theirs, w, b, False), [x, w, b], dtype, "eval")


def test_batch_norm_channels_last_layout_kept(route):
    x = rand(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = nft.batch_norm(x, None, None, training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_gradcheck(route):
    x, w, b = leaves(rand(4, 3, 5), rand(3, seed=1), rand(3, seed=2))
    assert torch.autograd.gradcheck(
        lambda x, w, b: nft.batch_norm(x, None, None, w, b, True), (x, w, b))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: nft.batch_norm(x, rm, rv, w, b, False), (x, w, b))


def test_batch_norm_errors_are_clear_and_leave_stats():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nft.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    assert rm.eq(0).all() and rv.eq(1).all()


# ---------------------------------------------------------------- FFN

def _ffn_inputs(dtype, d=6, h=10, lead=(2, 3), bias=True, seed=0):
    return [rand(*lead, d, dtype=dtype, seed=seed), rand(h, d, dtype=dtype, seed=seed + 1) * 0.5,
            rand(h, dtype=dtype, seed=seed + 2) if bias else None,
            rand(d, h, dtype=dtype, seed=seed + 3) * 0.5,
            rand(d, dtype=dtype, seed=seed + 4) if bias else None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_ffn_matches_torch(dtype, activation, bias, recompute, route):
    ins = _ffn_inputs(dtype, bias=bias)
    present = [t for t in ins if t is not None]

    def ours(*t):
        it = iter(t)
        a = [next(it) if s is not None else None for s in ins]
        return nft.ffn(*a, activation=activation, recompute=recompute)

    def theirs(*t):
        it = iter(t)
        a = [next(it) if s is not None else None for s in ins]
        return nft._torch_ref.ffn(*a, activation)

    compare_op(ours, theirs, present, dtype, f"ffn {activation}")
    with torch.no_grad():  # the inference operator
        close(nft.ffn(*ins, activation=activation), theirs(*present), dtype, "ffn inference")


def _gated_inputs(dtype, d=6, h=10, seed=0):
    """weight1 (2h, d) in nn.Linear layout, gate rows first; bias1 (2h,)."""
    x, w1, b1, w2, b2 = _ffn_inputs(dtype, d=d, h=h, seed=seed)
    return [x, torch.cat([w1, rand(h, d, dtype=dtype, seed=seed + 7) * 0.5]),
            torch.cat([b1, rand(h, dtype=dtype, seed=seed + 8)]), w2, b2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", GATED)
@pytest.mark.parametrize("recompute", [False, True])
def test_gated_ffn_matches_torch(dtype, activation, recompute, route):
    """Served by normffn's gated kernels: no fallback warning, every gradient as PyTorch's."""
    ins = _gated_inputs(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nft.FallbackWarning)
        compare_op(lambda *a: nft.ffn(*a, activation=activation, recompute=recompute),
                   lambda *a: nft._torch_ref.ffn(*a, activation), ins, dtype, activation)
        with torch.no_grad():
            close(nft.ffn(*ins, activation=activation), nft._torch_ref.ffn(*ins, activation),
                  dtype, f"{activation} inference")
    ff, ref = nft.FeedForward(6, 10, activation, dtype=dtype), \
        nft.TorchFeedForward(6, 10, activation, dtype=dtype)
    assert ff.fc1.weight.shape == (20, 6) and ff.fc2.weight.shape == (6, 10)
    ff.load_state_dict(ref.state_dict())
    compare_op(lambda x: ff(x), lambda x: ref(x), [ins[0]], dtype, f"FeedForward {activation}")


def test_gated_ffn_gradcheck(route):
    ins = leaves(*_gated_inputs(torch.float64, d=4, h=3))
    for act in GATED:
        assert torch.autograd.gradcheck(lambda *a: nft.ffn(*a, activation=act), ins)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="a torch build without MKL")
def test_ffn_multiplies_with_torchs_blas():
    # the x86 wheels export MKL's Fortran routines; normffn.torch registers and uses them
    from normffn import _blas
    assert nft.blas() == "torch"
    assert _blas.registered()[0] == "torch"
    seen = []
    real = _blas.current

    def spy():
        seen.append(real())
        return seen[-1]
    try:
        _blas.current = spy
        nft.ffn(torch.randn(3, 4), torch.randn(6, 4), None, torch.randn(4, 6), None)
    finally:
        _blas.current = real
    # the last read is the kernel call's (the first is using() saving the thread's slot)
    assert seen and seen[-1] != _blas.SCIPY


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_ffn_same_with_either_blas(activation):
    """torch's BLAS and scipy's give the same FFN and FFN-block results up to rounding."""
    gen = torch.Generator().manual_seed(3)
    d, h = 33, 70
    hw = 2 * h if activation in GATED else h
    inputs = [torch.randn(*s, generator=gen, dtype=torch.float64)
              for s in ((5, 7, d), (hw, d), (hw,), (d, h), (d,), (d,), (d,))]

    def both():
        x, w1, b1, w2, b2, nw, nb = leaves(*inputs)
        y = nft.ffn(x, w1, b1, w2, b2, activation)
        z = nft.ffn_block(x, nw, nb, w1, b1, w2, b2, activation)
        return (y, z) + torch.autograd.grad(y.sum() + z.square().sum(), (x, w1, b1, w2, b2, nw))
    before = nft.blas()
    try:
        nft.set_blas("scipy")
        assert nft.blas() == "scipy"
        with_scipy = both()
    finally:
        nft.set_blas(before)
    with_default = both()
    for i, (a, b) in enumerate(zip(with_scipy, with_default)):
        close(a, b, torch.float64, f"result {i}")


def test_set_blas_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="'torch' or 'scipy'"):
        nft.set_blas("mkl")


def test_ffn_unknown_activation_is_an_error():
    x, w1, b1, w2, b2 = _ffn_inputs(torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        nft.ffn(x, w1, b1, w2, b2, activation="tanh")


def test_ffn_gradcheck(route):
    ins = leaves(*_ffn_inputs(torch.float64, d=4, h=5, lead=(3,)))
    for act in ("gelu", "silu"):
        assert torch.autograd.gradcheck(lambda *a: nft.ffn(*a, activation=act), ins)


def test_ffn_weights_reach_kernel_as_views(monkeypatch):
    seen = {}
    real = normffn.ffn_forward

    def spy(x, w1, b1, w2, b2, activation="relu", recompute=False, **kw):
        seen.update(x=x, w1=w1, w2=w2)
        return real(x, w1, b1, w2, b2, activation, recompute=recompute, **kw)

    monkeypatch.setattr(normffn, "ffn_forward", spy)
    ff = nft.FeedForward(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    y = ff(x)
    assert np.shares_memory(seen["w1"], ff.fc1.weight.detach().numpy())
    assert seen["w1"].shape == (8, 16) and seen["w1"].flags.f_contiguous
    assert np.shares_memory(seen["w2"], ff.fc2.weight.detach().numpy())
    assert np.shares_memory(seen["x"], x.detach().numpy())
    y.sum().backward()
    assert ff.fc1.weight.grad.shape == (16, 8)


def test_only_needed_grads_reach_numpy(monkeypatch, route):
    """needs= (from autograd's needs_input_grad) reaches each NumPy backward, which skips the
    rest; autograd gets None for them."""
    calls = []

    def spy_on(name):
        real = getattr(normffn, name)

        def spy(dy, ctx, **kw):
            calls.append((name, kw.get("needs")))
            return real(dy, ctx, **kw)
        monkeypatch.setattr(normffn, name, spy)

    for name in ("ffn_backward", "layer_norm_backward", "rms_norm_backward",
                 "batch_norm_backward"):
        spy_on(name)
    x, w1, b1, w2, b2 = _ffn_inputs(torch.float32)
    w1.requires_grad_()
    nft.ffn(x, w1, b1, w2, b2).sum().backward()
    assert calls[-1] == ("ffn_backward", (False, True, False, False, False))
    assert w1.grad is not None
    x, w = rand(4, 6).requires_grad_(), rand(6, seed=1)
    nft.layer_norm(x, 6, w, rand(6, seed=2)).sum().backward()
    assert calls[-1] == ("layer_norm_backward", (True, False, False))
    nft.rms_norm(x, 6, w.requires_grad_()).sum().backward()
    assert calls[-1] == ("rms_norm_backward", (True, True))
    xb = rand(4, 3)
    wb = rand(3, seed=3).requires_grad_()
    nft.batch_norm(xb, None, None, wb, None, True).sum().backward()
    assert calls[-1] == ("batch_norm_backward", (False, True, False))


# ---------------------------------------------------------------- zero copy

@pytest.mark.parametrize("grad", [False, True])
def test_layer_norm_is_zero_copy(monkeypatch, grad):
    """Inference runs normffn.layer_norm, training layer_norm_forward (statistics kept); both
    read x in place and hand back the kernel's own output."""
    seen = {}
    name = "layer_norm_forward" if grad else "layer_norm"
    real = getattr(normffn, name)

    def spy(x, *a, **k):
        r = real(x, *a, **k)
        seen.update(x=x, y=r[0] if grad else r)
        return r

    monkeypatch.setattr(normffn, name, spy)
    x = torch.randn(4, 16, requires_grad=grad)
    y = nft.layer_norm(x, 16)
    assert np.shares_memory(seen["x"], x.detach().numpy())
    assert y.data_ptr() == seen["y"].ctypes.data


def test_eager_route_skips_dispatcher_and_modes_get_the_operator(monkeypatch):
    """Plain eager calls run the implementation directly; under a dispatch mode (fake
    tensors: what export and compile use) the operator and its fake kernel run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def boom(*a, **k):
        raise AssertionError("dispatcher used")

    x = torch.randn(4, 8, requires_grad=True)
    y = nft.layer_norm(x, 8)
    assert type(y.grad_fn).__name__.startswith("LayerNormFunction")
    with FakeTensorMode():
        xf = torch.empty(4, 3, 8)
        yf = nft.layer_norm(xf, 8)
        assert yf.shape == (4, 3, 8)
        yf = nft.batch_norm(xf, None, None, training=True)
        assert yf.shape == (4, 3, 8)
    monkeypatch.setattr(_util, "EAGER_FAST_PATH", False)
    y = nft.layer_norm(x, 8)
    assert not type(y.grad_fn).__name__.startswith("LayerNormFunction")


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("case", ["ln", "rms", "bn_train", "bn_eval_cl", "ffn", "ffn_recompute",
                                  "ffn_swiglu"])
def test_opcheck(case):
    d = torch.float64
    if case == "ln":
        op, args = _ops.layer_norm, (rand(3, 4, 5).requires_grad_(), [4, 5],
                                     rand(4, 5).requires_grad_(), None, 1e-5)
    elif case == "rms":
        op, args = _ops.rms_norm, (rand(3, 4, 5).requires_grad_(), [5],
                                   rand(5).requires_grad_(), 1e-6)
    elif case == "ffn_swiglu":
        op, args = _ops.ffn_forward, (*leaves(*_gated_inputs(d)), "swiglu", False)
    elif case.startswith("bn"):
        x = rand(4, 3, 2, 5)
        if case.endswith("cl"):
            x = x.to(memory_format=torch.channels_last)
        op, args = _ops.batch_norm, (x.requires_grad_(), torch.zeros(3, dtype=d),
                                     torch.ones(3, dtype=d), rand(3).requires_grad_(), None,
                                     case == "bn_train", 0.1, 1e-5)
    else:
        ins = leaves(*_ffn_inputs(d))
        op, args = _ops.ffn_forward, (*ins, "gelu", case == "ffn_recompute")
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["ln", "ln_nobias", "ln_noaffine", "rms", "bn1d", "bn1d_3d",
                                  "bn2d", "bn2d_cl", "bn3d", "bn_cma", "bn_untracked",
                                  "bn_noaffine"])
def test_norm_modules_match_torch(kind, dtype):
    torch.manual_seed(0)
    if kind.startswith("ln"):
        theirs = nn.LayerNorm((4, 6), bias=kind != "ln_nobias",
                              elementwise_affine=kind != "ln_noaffine", dtype=dtype)
        ours = nft.LayerNorm((4, 6), bias=kind != "ln_nobias",
                             elementwise_affine=kind != "ln_noaffine", dtype=dtype)
        shape = (3, 4, 6)
    elif kind == "rms":
        theirs, ours, shape = nn.RMSNorm(6, dtype=dtype), nft.RMSNorm(6, dtype=dtype), (3, 4, 6)
    else:
        kw = dict(dtype=dtype)
        if kind == "bn_cma":
            kw["momentum"] = None
        if kind == "bn_untracked":
            kw["track_running_stats"] = False
        if kind == "bn_noaffine":
            kw["affine"] = False
        dims = 3 if kind == "bn3d" else 2 if kind.startswith("bn2d") else 1
        theirs = getattr(nn, f"BatchNorm{dims}d")(5, **kw)
        ours = getattr(nft, f"BatchNorm{dims}d")(5, **kw)
        shape = {3: (2, 5, 3, 2, 2), 2: (4, 5, 3, 2),
                 1: (9, 5) if kind == "bn1d" else (4, 5, 7)}[dims]
    for p in theirs.parameters():
        with torch.no_grad():
            p.add_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for mode in ("train", "train", "train", "eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(shape, dtype=dtype) * 2 + 1
        if kind == "bn2d_cl":
            x = x.to(memory_format=torch.channels_last)
        xa, xb = leaves(x, x)
        ya, yb = ours(xa), theirs(xb)
        close(ya, yb, dtype, f"{kind} {mode} y")
        dy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [xa] + list(ours.parameters()), dy)
        gb = torch.autograd.grad(yb, [xb] + list(theirs.parameters()), dy)
        for a, b in zip(ga, gb):
            close(a, b, dtype, f"{kind} {mode} grad")
        for (ka, va), (kb, vb) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert ka == kb
            close(va, vb, dtype, f"{kind} {mode} {ka}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_matches_torch(activation, bias):
    theirs = nft.TorchFeedForward(8, 20, activation, bias, dtype=torch.float64)
    ours = nft.FeedForward(8, 20, activation, bias, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours.fc1, nn.Linear) and ours.fc1.weight.shape == (20, 8)
    x = rand(2, 5, 8)
    compare_op(lambda x: ours(x), lambda x: theirs(x), [x], torch.float64, "FeedForward")
    ga = torch.autograd.grad(ours(x).square().sum(), list(ours.parameters()))
    gb = torch.autograd.grad(theirs(x).square().sum(), list(theirs.parameters()))
    for a, b in zip(ga, gb):
        close(a, b, torch.float64, "FeedForward param grad")


# ---------------------------------------------------------------- buffer reuse (issue #14)

def _pair(activation="gelu", d=8, h=20, seed=0):
    torch.manual_seed(seed)
    ref = nft.TorchFeedForward(d, h, activation, dtype=torch.float64)
    ours = nft.FeedForward(d, h, activation, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _kept(module, role):
    return module._step_buffers._free.get(role)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_feed_forward_reuses_buffers_across_steps(activation):
    """A training loop (zero_grad -> forward -> backward -> step): from the second step on the
    kernels write into the first step's arrays, and every step matches stock PyTorch."""
    ours, ref = _pair(activation)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    kept = None
    for step in range(4):
        x = rand(3, 5, 8, seed=step)
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        for a, b in zip(ours.parameters(), ref.parameters()):
            close(a, b, torch.float64, f"step {step} parameter")
        # weak references: a strong one held here would (rightly) keep the buffer from reuse
        now = {r: weakref.ref(_kept(ours, r)) for r in ("y", "hidden", "dw1", "db1", "dw2",
                                                         "db2")}
        if kept is not None:
            for r in now:
                assert now[r]() is kept[r](), f"step {step}: {r} was not reused"
        kept = now


def test_feed_forward_never_overwrites_a_live_buffer():
    """Two forwards before one backward (gradient accumulation), retain_graph, the module
    applied twice in a step, and an x.grad kept by the caller: the buffers in use are left
    alone, so the gradients are PyTorch's."""
    ours, ref = _pair("relu")
    x1, x2 = rand(4, 8, seed=1), rand(4, 8, seed=2)
    for model in (ours, ref):   # a first step so there are buffers to reuse
        model(x1).sum().backward()
    grads = []
    for model in (ours, ref):
        model.zero_grad()
        loss = model(x1).square().sum() + 3 * model(x2).square().sum()
        loss.backward(retain_graph=True)
        model(x2).sum().backward()          # a new step while the first graph is retained
        loss.backward()                     # ... which must still see its own hidden
        xa = x1.clone().requires_grad_()
        model(model(xa)).square().sum().backward()    # one module twice in a graph
        ga = xa.grad
        xb = x2.clone().requires_grad_()
        model(xb).square().sum().backward()           # xa.grad must survive this step
        grads.append([p.grad.clone() for p in model.parameters()] + [ga, xb.grad])
    for a, b in zip(*grads):
        close(a, b, torch.float64, "gradient")


def test_feed_forward_buffers_copy_and_release():
    ours, _ = _pair()
    ours(rand(4, 8)).sum().backward()
    assert _kept(ours, "hidden") is not None
    assert _kept(copy.deepcopy(ours), "hidden") is None
    ours.release_buffers()
    assert _kept(ours, "hidden") is None
    with torch.no_grad():   # inference reuses its output buffer only
        x1, x2 = rand(4, 8, seed=1), rand(4, 8, seed=2)
        y1 = ours(x1).clone()
        kept = weakref.ref(_kept(ours, "y"))
        y2 = ours(x2)
        assert _kept(ours, "y") is kept()            # the first call's output array, reused
        close(y1, nft.TorchFeedForward.forward(ours, x1), torch.float64,
              "first output, after its buffer was reused")
        close(y2, nft.TorchFeedForward.forward(ours, x2), torch.float64, "second output")


HAS_BLOCK = hasattr(normffn, "ffn_block_backward")


@pytest.mark.skipif(not HAS_BLOCK, reason="normffn.ffn_block not in this build")
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_ffn_block_fused_training(norm, placement):
    """Where normffn has ffn_block, eager training runs the fused op (FFNBlockFunction)."""
    kw = dict(norm=norm, placement=placement, dtype=torch.float64)
    theirs, ours = nft.TorchFFNBlock(8, 16, "gelu", **kw), nft.FFNBlock(8, 16, "gelu", **kw)
    ours.load_state_dict(theirs.state_dict())
    x = rand(3, 4, 8).requires_grad_()
    assert type(ours(x).grad_fn).__name__.startswith("FFNBlockFunction")
    compare_op(lambda x: ours(x), lambda x: theirs(x), [x.detach()], torch.float64,
               "FFNBlock fused")
    ga = torch.autograd.grad(ours(x).square().sum(), [x] + list(ours.parameters()))
    gb = torch.autograd.grad(theirs(x).square().sum(), [x] + list(theirs.parameters()))
    for a, b in zip(ga, gb):
        close(a, b, torch.float64, "FFNBlock fused grad")
    ins = leaves(x.detach(), ours.norm.weight, getattr(ours.norm, "bias", None), ours.fc1.weight,
                 ours.fc1.bias, ours.fc2.weight, ours.fc2.bias)
    present = [t for t in ins if t is not None]

    def fn(*t):
        it = iter(t)
        a = [next(it) if s is not None else None for s in ins]
        return nft.ffn_block(*a, "gelu", norm=norm, placement=placement)
    assert torch.autograd.gradcheck(fn, present)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_ffn_block_matches_torch(norm, placement):
    kw = dict(norm=norm, placement=placement, dtype=torch.float64)
    theirs, ours = nft.TorchFFNBlock(8, 16, "silu", **kw), nft.FFNBlock(8, 16, "silu", **kw)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = rand(3, 4, 8)
    compare_op(lambda x: ours(x), lambda x: theirs(x), [x], torch.float64, "FFNBlock")
    ga = torch.autograd.grad(ours(x).square().sum(), list(ours.parameters()))
    gb = torch.autograd.grad(theirs(x).square().sum(), list(theirs.parameters()))
    for a, b in zip(ga, gb):
        close(a, b, torch.float64, "FFNBlock param grad")
    with torch.no_grad():
        close(ours(x), theirs(x), torch.float64, "FFNBlock inference")



def _block_pair(norm="layer", placement="pre", activation="gelu", d=8, h=16, seed=0):
    torch.manual_seed(seed)
    kw = dict(norm=norm, placement=placement, dtype=torch.float64)
    ref = nft.TorchFFNBlock(d, h, activation, **kw)
    ours = nft.FFNBlock(d, h, activation, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


_BLOCK_ROLES = ("y", "hidden", "kept", "dx", "dnorm_weight", "dw1", "db1", "dw2", "db2")


@pytest.mark.skipif(not HAS_BLOCK, reason="normffn.ffn_block not in this build")
@pytest.mark.parametrize("norm,placement,activation",
                         [("layer", "pre", "relu"), ("rms", "post", "gelu"),
                          ("layer", "post", "swiglu")])
def test_ffn_block_reuses_buffers_across_steps(norm, placement, activation):
    """A training loop (zero_grad -> forward -> backward -> step) through the fused op: from the
    second step on the kernels write into the first step's arrays, every step matches stock
    PyTorch (parameters and x.grad), and a step of another shape neither reuses nor disturbs
    them."""
    ours, ref = _block_pair(norm, placement, activation)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    kept = None
    shapes = [(3, 5, 8), (3, 5, 8), (7, 8), (3, 5, 8), (3, 5, 8)]
    for step, shape in enumerate(shapes):
        x = rand(*shape, seed=step)
        xg = []
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            y = model(xi)
            if model is ours:
                assert type(y.grad_fn).__name__.startswith("FFNBlockFunction")
            y.square().sum().backward()
            opt.step()
            xg.append(xi.grad)
        close(xg[0], xg[1], torch.float64, f"step {step} x.grad")
        for a, b in zip(ours.parameters(), ref.parameters()):
            close(a, b, torch.float64, f"step {step} parameter")
        del xg, xi, y
        # weak references: a strong one held here would (rightly) keep the buffer from reuse
        now = {r: weakref.ref(_kept(ours, r)) for r in _BLOCK_ROLES}
        if kept is not None and shapes[step - 1] == shape:
            for r in now:
                assert now[r]() is kept[r](), f"step {step}: {r} was not reused"
        elif kept is not None:
            assert now["y"]() is not kept["y"](), f"step {step}: y reused across shapes"
        kept = now


@pytest.mark.skipif(not HAS_BLOCK, reason="normffn.ffn_block not in this build")
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_ffn_block_never_overwrites_a_live_buffer(placement):
    """Gradient accumulation over two forwards, retain_graph with a whole step in between, one
    module twice in a graph, an x.grad and an output the caller keeps across steps, .grad
    accumulated in place (zero_grad(set_to_none=False)): the buffers in use are left alone, so
    every value is PyTorch's."""
    ours, ref = _block_pair("layer", placement)
    x1, x2 = rand(4, 8, seed=1), rand(4, 8, seed=2)
    for model in (ours, ref):   # a first step so there are buffers to reuse
        model(x1).sum().backward()
    results = []
    for model in (ours, ref):
        model.zero_grad()
        loss = model(x1).square().sum() + 3 * model(x2).square().sum()
        loss.backward(retain_graph=True)
        model(x2).sum().backward()          # a new step while the first graph is retained
        loss.backward()                     # ... which must still see its own saved arrays
        xa = x1.clone().requires_grad_()
        model(model(xa)).square().sum().backward()    # one module twice in a graph
        ga = xa.grad
        xb = x2.clone().requires_grad_()
        model(xb).square().sum().backward()           # xa.grad must survive this step
        kept_y = model(x1)                            # an output kept by the caller ...
        model(x2).sum().backward()                    # ... across another step
        g_before = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=False)            # .grad kept, accumulated in place
        model(x1).square().sum().backward()
        model(x2).square().sum().backward()
        results.append(g_before + [p.grad.clone() for p in model.parameters()]
                       + [ga, xb.grad, kept_y.detach()])
    for a, b in zip(*results):
        close(a, b, torch.float64, "value")


@pytest.mark.skipif(not HAS_BLOCK, reason="normffn.ffn_block not in this build")
def test_ffn_block_buffers_copy_and_release():
    ours, _ = _block_pair()
    ours(rand(4, 8)).sum().backward()
    assert _kept(ours, "hidden") is not None and _kept(ours, "dw1") is not None
    assert _kept(copy.deepcopy(ours), "hidden") is None
    ours.release_buffers()
    assert _kept(ours, "hidden") is None and _kept(ours, "dw1") is None


def test_state_dict_round_trip():
    """normffn module -> torch counterpart -> normffn module, through the state dict."""
    pairs = [(nft.LayerNorm(6), nn.LayerNorm(6)), (nft.BatchNorm2d(4), nn.BatchNorm2d(4)),
             (nft.RMSNorm(6), nn.RMSNorm(6)), (nft.FeedForward(6, 12), nft.TorchFeedForward(6, 12)),
             (nft.FFNBlock(6, 12), nft.TorchFFNBlock(6, 12))]
    for ours, theirs in pairs:
        for t in ours.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
        theirs.load_state_dict(ours.state_dict())
        back = copy.deepcopy(ours)
        for t in back.state_dict().values():
            t.zero_()
        back.load_state_dict(theirs.state_dict())
        for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), k


# ---------------------------------------------------------------- patch

class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return x + self.bn(torch.relu(self.fc(self.ln(x))))


class _MyLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def _small_model(d=12):
    torch.manual_seed(0)
    shared = nn.LayerNorm(d)
    return nn.Sequential(nn.Linear(6, d), _Block(d), shared, _Block(d), shared,
                         _MyLayerNorm(d), nn.RMSNorm(d), nn.Linear(d, 1)).double()


def test_patch_replaces_in_place_sharing_parameters():
    model = _small_model()
    params = {n: id(p) for n, p in model.named_parameters()}
    buffers = {n: id(b) for n, b in model.named_buffers()}
    keys = list(model.state_dict())
    assert nft.patch(model) is model
    assert type(model[1].ln) is nft.LayerNorm and type(model[1].bn) is nft.BatchNorm1d
    assert type(model[2]) is nft.LayerNorm and model[2] is model[4]  # still shared
    assert type(model[5]) is _MyLayerNorm
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert {n: id(b) for n, b in model.named_buffers()} == buffers
    assert list(model.state_dict()) == keys
    report = nft.patch_report(model)
    assert ("1.ln", "LayerNorm") in report.replaced and ("2", "LayerNorm") in report.replaced
    skipped = {name: why for name, _, why in report.skipped}
    assert "subclass" in skipped["5"]
    assert type(model[6]) is nft.RMSNorm
    root = nft.patch(nn.LayerNorm(3))
    assert type(root) is nft.LayerNorm


def test_patch_skips_what_normffn_cannot_serve():
    model = nn.Sequential(nn.LayerNorm(4).half(), nn.LayerNorm(4).to("meta"))
    nft.patch(model)
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is nn.LayerNorm
    whys = [why for _, _, why in nft.patch_report(model).skipped]
    assert "float16" in whys[0] and "meta" in whys[1]


def test_patched_model_trains_like_torch():
    """20 SGD steps, the optimizer built before the patch: same losses as stock PyTorch."""
    stock = _small_model()
    patched = copy.deepcopy(stock)
    opt_patched = torch.optim.SGD(patched.parameters(), lr=0.05, momentum=0.9)
    nft.patch(patched)
    opt_stock = torch.optim.SGD(stock.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64)
        t = x[:, :1].sin()
        losses = []
        for model, opt in ((stock, opt_stock), (patched, opt_patched)):
            opt.zero_grad()
            loss = F.mse_loss(model(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-9, abs=1e-12), step
    assert losses[0] < 0.5
    stock.eval()
    patched.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    close(patched(x), stock(x), torch.float64, "eval after training")


# ---------------------------------------------------------------- torch.compile (slow: few)

def test_compile_fullgraph_forward_backward(tmp_path, monkeypatch):
    # a fresh Inductor cache: a graph cached by an earlier build of these operators (another
    # fake's output strides) would otherwise be reused
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nft.LayerNorm(16), nft.FeedForward(16, 32, "gelu"), nft.BatchNorm1d(16))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 16)
        xa, xb = leaves(x, x)
        ya, yb = compiled(xa), ref(xb)
        close(ya, yb, torch.float32, "compiled y")
        ga = torch.autograd.grad(ya.square().sum(), [xa] + list(model.parameters()))
        gb = torch.autograd.grad(yb.square().sum(), [xb] + list(ref.parameters()))
        for a, b in zip(ga, gb):
            close(a, b, torch.float32, "compiled grad")
    close(model[2].running_var, ref[2].running_var, torch.float32, "compiled running_var")
    assert model[2].num_batches_tracked.item() == 2


# ---------------------------------------------------------------- fallbacks

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_falls_back_with_one_warning(dtype):
    x = torch.randn(4, 8, dtype=dtype)
    with pytest.warns(nft.FallbackWarning, match=str(dtype).replace("torch.", "")):
        y = nft.layer_norm(x, 8)
    assert torch.equal(y, F.layer_norm(x, (8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nft.layer_norm(x, 8)
    w1, w2 = torch.randn(5, 8, dtype=dtype), torch.randn(8, 5, dtype=dtype)
    with pytest.warns(nft.FallbackWarning, match="ffn"):
        y = nft.ffn(x, w1, None, w2, None)
    assert torch.equal(y, F.linear(F.relu(F.linear(x, w1)), w2))


def test_other_device_and_mixed_dtypes_fall_back():
    x = torch.randn(4, 8, device="meta")
    with pytest.warns(nft.FallbackWarning, match="device meta"):
        assert nft.layer_norm(x, 8).device.type == "meta"
    # bfloat16 activations with float32 stats: PyTorch's mixed-precision BatchNorm runs
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(nft.FallbackWarning, match="bfloat16"):
        y = nft.batch_norm(torch.randn(4, 3, dtype=torch.bfloat16), rm, rv, training=True)
    assert y.dtype == torch.bfloat16 and not rm.eq(0).all()  # torch's op updated the stats
    # float32 input, float64 weight: PyTorch's own error, after the warning naming the reason
    with pytest.warns(nft.FallbackWarning, match="mixed dtypes float32 and float64"):
        with pytest.raises(RuntimeError):
            nft.layer_norm(torch.randn(2, 4), 4, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_input_modified_before_backward_is_caught(route, op):
    """The eager Functions keep the NumPy context, yet save x and weight as tensors: an input
    changed in place between forward and backward is autograd's error, not a stale gradient."""
    x, w = leaves(torch.randn(3, 8), torch.randn(8))
    with torch.no_grad():
        xin = x * 1.0
    xin.requires_grad_(True)
    y = getattr(nft, op)(xin, (8,), w)
    with torch.no_grad():
        xin.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_falls_back(route):
    x, w, b = leaves(rand(3, 5), rand(5, seed=1), rand(5, seed=2))
    with pytest.warns(nft.FallbackWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(lambda x, w, b: nft.layer_norm(x, 5, w, b),
                                            (x, w, b))
    ins = leaves(*_ffn_inputs(torch.float64, d=3, h=4, lead=(2,)))
    with pytest.warns(nft.FallbackWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(lambda *a: nft.ffn(*a, activation="gelu"), ins)
    xb, wb = leaves(rand(4, 3), rand(3, seed=3))
    with pytest.warns(nft.FallbackWarning, match="double backward"):
        assert torch.autograd.gradgradcheck(
            lambda x, w: nft.batch_norm(x, None, None, w, None, True), (xb, wb))


def test_core_never_imports_torch():
    code = "import sys, normffn, normffn.reference; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_large_outputs_are_allocated_by_torch_and_correct():
    """From NumPy's huge-page size (4 MiB) on, normffn.torch passes torch-allocated outputs to
    the kernels (_util.big_out: no madvise, no compaction stall); results stay exact."""
    assert _util.big_out((1023, 1024), np.float32) is None            # just under 4 MiB
    big = _util.big_out((1025, 1024), np.float32)
    assert big.flags.c_contiguous and big.dtype == np.float32 and big.shape == (1025, 1024)
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((1100, 1024), (1024,), (1024,)))
    compare_op(lambda *a: nft.layer_norm(a[0], (1024,), a[1], a[2]),
               lambda *a: F.layer_norm(a[0], (1024,), a[1], a[2]), (x, w, b), torch.float32,
               "layer_norm 1100x1024")
    compare_op(lambda *a: nft.rms_norm(a[0], (1024,), a[1]),
               lambda *a: F.rms_norm(a[0], (1024,), a[1]), (x, w), torch.float32,
               "rms_norm 1100x1024")
    with torch.no_grad():
        close(nft.layer_norm(x, (1024,), w, b), F.layer_norm(x, (1024,), w, b), torch.float32,
              "layer_norm inference")
    # FFN whose hidden (1024 x 1100 float32, 4.3 MiB) and block outputs take the same path
    d, h = 8, 1100
    ins = [torch.randn(*s, generator=gen) / 4 for s in ((1024, d), (h, d), (h,), (d, h), (d,),
                                                        (d,), (d,))]
    compare_op(lambda *a: nft.ffn(*a, "gelu"),
               lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
               ins[:5], torch.float32, "ffn 1024x8x1100")
    compare_op(lambda x, w1, b1, w2, b2, nw, nb: nft.ffn_block(x, nw, nb, w1, b1, w2, b2, "relu"),
               lambda x, w1, b1, w2, b2, nw, nb: x + F.linear(
                   F.relu(F.linear(F.layer_norm(x, (d,), nw, nb), w1, b1)), w2, b2),
               ins, torch.float32, "ffn_block 1024x8x1100")

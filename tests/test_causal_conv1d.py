"""causal_conv1d: Triton (interpreter on CPU) vs the PyTorch reference, and the reference vs transformers.

Shapes are small channel counts (not multiples of the tile sizes) with the odd lengths of the anchors; the
released channel counts run in the GPU test and the benchmark.
"""
import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.causal_conv1d import (SNAKE_EPS, causal_conv1d, causal_conv1d_ref, prepare_weight,
                                           snake_beta_ref)
from tests._tolerances import KERNEL, assert_close

# (name, in_ch, out_ch, width, groups): the Code2Wav conv kinds at reduced width
KINDS = {
    "dense": (24, 20, 7, 1),        # residual-unit conv1 (dim -> dim, k7), in != out to catch index swaps
    "depthwise": (24, 24, 7, 24),   # ConvNeXt dwconv
    "pointwise": (24, 40, 1, 1),    # residual-unit conv2 (k1)
    "to_mono": (20, 1, 7, 1),       # final 96 -> 1
}


def _params(kind, dtype, bias=True, snake=False, scale_state=True, batch=2, device="cpu"):
    c_in, c_out, width, groups = KINDS[kind]
    w = torch.randn(c_out, c_in // groups, width, device=device) / (c_in // groups * width) ** 0.5
    p = dict(weight=w.to(dtype), groups=groups,
             bias=torch.randn(c_out, device=device).to(dtype) if bias else None)
    if snake:
        p["snake_alpha"] = 0.5 * torch.randn(c_in, device=device)
        p["snake_beta"] = 0.5 * torch.randn(c_in, device=device)
    return p, c_in


def _check_state(st, st_ref, snake):
    """Without snake the state is copied bits; with it the sin may differ by an ulp between backends."""
    if snake:
        assert_close(st, st_ref, name="state")
    else:
        assert torch.equal(st, st_ref), "new state must be the exact tail of cat(state, x)"


def _triton(*args, **kwargs):
    with force_triton():
        return causal_conv1d(*args, **kwargs)


CASES = [
    # kind, length, dilation, bias, snake, dtype
    ("dense", 1, 1, True, True, torch.float32),
    ("dense", 7, 3, False, False, torch.float32),
    ("dense", 129, 9, True, True, torch.float32),
    ("dense", 151, 1, True, False, torch.float16),
    ("dense", 151, 9, False, True, torch.float16),
    ("depthwise", 1, 1, True, False, torch.float32),
    ("depthwise", 151, 1, True, False, torch.float32),
    ("depthwise", 129, 3, False, True, torch.float16),
    ("pointwise", 129, 1, True, True, torch.float32),
    ("pointwise", 7, 1, False, False, torch.float16),
    ("to_mono", 151, 1, True, True, torch.float32),
    ("to_mono", 129, 1, True, True, torch.float16),
]


@pytest.mark.parametrize("kind,length,dilation,bias,snake,dtype", CASES)
def test_triton_matches_ref(kind, length, dilation, bias, snake, dtype):
    p, c_in = _params(kind, dtype, bias, snake)
    s = (p["weight"].shape[-1] - 1) * dilation
    x = torch.randn(2, c_in, length).to(dtype)
    state = torch.randn(2, c_in, s).to(dtype)
    y, st = _triton(x, dilation=dilation, state=state, return_state=True, **p)
    y_ref, st_ref = causal_conv1d_ref(x, dilation=dilation, state=state, return_state=True, **p)
    assert_close(y, y_ref, name="y")
    _check_state(st, st_ref, snake)
    # no state = zero history, and state_out is optional
    assert_close(_triton(x, dilation=dilation, **p), causal_conv1d_ref(x, dilation=dilation, **p), name="y0")


def test_fp16_error_budget():
    """Three-way budget: |triton fp16 - fp32 truth| <= 2 |torch fp16 - fp32 truth| + atol."""
    p32, c_in = _params("dense", torch.float32, snake=True)
    x32 = torch.randn(2, c_in, 129)
    p16 = {k: (v.half() if torch.is_tensor(v) and k in ("weight", "bias") else v) for k, v in p32.items()}
    x16 = x32.half()
    truth = causal_conv1d_ref(x32, dilation=3, **p32).double()
    err_triton = (_triton(x16, dilation=3, **p16).double() - truth).abs().max().item()
    err_torch = (causal_conv1d_ref(x16, dilation=3, upcast=False, **p16).double() - truth).abs().max().item()
    print(f"fp16 max err: triton {err_triton:.3g}, torch {err_torch:.3g}")
    assert err_triton <= 2 * err_torch + KERNEL[torch.float16][0]


@pytest.mark.parametrize("kind,dilation,snake,chunks", [
    ("dense", 9, True, [1, 2, 7, 1, 40, 3]),
    ("dense", 3, False, [7, 7, 1]),
    ("depthwise", 1, False, [1, 2, 7, 13]),
    ("to_mono", 1, True, [2, 1, 30]),
])
def test_streaming_equals_one_shot(kind, dilation, snake, chunks):
    """Chunks with the state carried (through state_out double buffers) == one call on the whole input."""
    p, c_in = _params(kind, torch.float32, snake=snake)
    s = (p["weight"].shape[-1] - 1) * dilation
    x = torch.randn(2, c_in, sum(chunks))
    y_full, st_full = causal_conv1d_ref(x, dilation=dilation, return_state=True, **p)
    state = torch.zeros(2, c_in, s)
    spare = torch.empty_like(state)
    ys, t = [], 0
    for n in chunks:
        y, new = _triton(x[..., t:t + n], dilation=dilation, state=state, return_state=True, state_out=spare, **p)
        assert new is spare
        state, spare = new, state
        ys.append(y)
        t += n
    assert_close(torch.cat(ys, -1), y_full, name="streamed y")
    _check_state(state, st_full, snake)


def test_length_one_with_state_is_a_decode_step():
    """L=1 with state reads exactly the last (W-1)*d history columns and the new sample."""
    p, c_in = _params("dense", torch.float32, snake=True)
    state = torch.randn(1, c_in, 18)
    x = torch.randn(1, c_in, 1)
    y, st = _triton(x, dilation=3, state=state, return_state=True, **p)
    act = snake_beta_ref(x, p["snake_alpha"], p["snake_beta"])
    window = torch.cat([state, act], -1)[..., ::3]                      # taps at dilation 3
    expected = torch.einsum("oik,bik->bo", p["weight"], window) + p["bias"]
    assert_close(y[..., 0], expected, atol=1e-5, rtol=1e-5, name="y")
    _check_state(st, torch.cat([state[..., 1:], act], -1), snake=True)


def test_sliced_inputs():
    """x, state and weight as strided views with storage offsets; output into a strided out= view."""
    p, c_in = _params("dense", torch.float32, snake=True)
    big = torch.randn(3, c_in + 5, 2 * 129 + 3)
    x = big[1:3, 2:2 + c_in, 3::2]                                     # offset + time stride 2
    state_big = torch.randn(2, 24, c_in + 1)
    state = state_big[..., 1:].transpose(1, 2)                          # (2, c_in, 24), channel stride 1
    w = prepare_weight(p["weight"])
    assert not w.is_contiguous() and w.stride(2) == w.shape[0] * w.shape[1]
    out_big = torch.zeros(2, 129, p["weight"].shape[0])
    out = out_big.transpose(1, 2)                                        # (2, out, 129), channels-last
    q = dict(p, weight=w)
    y, st = _triton(x, dilation=4, state=state, return_state=True, out=out, **q)
    y_ref, st_ref = causal_conv1d_ref(x.contiguous(), dilation=4, state=state.contiguous(), return_state=True,
                                      **p)
    assert y.data_ptr() == out.data_ptr()
    assert_close(out_big.transpose(1, 2), y_ref, name="y")
    _check_state(st, st_ref, snake=True)

    pd, c = _params("depthwise", torch.float16)
    xd = torch.randn(2, 2 * c, 57).half()[:, ::2]
    assert_close(_triton(xd, **pd), causal_conv1d_ref(xd, **pd), name="depthwise sliced")


@pytest.mark.parametrize("kind,length,dilation,dtype", [
    ("dense", 1, 1, torch.float32), ("dense", 37, 3, torch.float32), ("dense", 129, 9, torch.float16),
    ("pointwise", 33, 1, torch.float32), ("depthwise", 1, 1, torch.float32), ("depthwise", 45, 1, torch.float16),
    ("to_mono", 17, 1, torch.float32),
])
def test_residual_and_pre_start(kind, length, dilation, dtype):
    """Fused residual (dense) and the pre-start mask: streams at positions 0, 1 and far in, lags of 0, a part
    of the chunk, more than the chunk; strided residual; the state stores the masked (zero) samples."""
    p, c_in = _params(kind, dtype, snake=kind != "depthwise", batch=3)
    c_out = p["weight"].shape[0]
    s = (p["weight"].shape[-1] - 1) * dilation
    x = torch.randn(3, c_in, length).to(dtype)
    state = torch.randn(3, c_in, s).to(dtype)
    pos = torch.tensor([0, 1, 1000], dtype=torch.int64)
    res = None
    if kind != "depthwise":
        res = torch.randn(3, length, c_out).to(dtype).transpose(1, 2)  # channels-last view
    for lag, unit in ((0, 1), (max(length // 2, 1), max(length // 3, 1)), (length + 3, 2)):
        kw = dict(dilation=dilation, state=state, return_state=True, residual=res, pre_start=(pos, lag, unit), **p)
        y, st = _triton(x, **kw)
        y_ref, st_ref = causal_conv1d_ref(x, **kw)
        assert_close(y, y_ref, name=f"y lag={lag}")
        _check_state(st, st_ref, "snake_alpha" in p)
        # the reference itself: zeroing first, then the plain conv (plus the residual)
        lead = (lag - pos * unit).clamp_min(0)
        xm = x.masked_fill((torch.arange(length)[None, :] < lead[:, None])[:, None], 0)
        plain = causal_conv1d_ref(xm, dilation=dilation, state=state, **p)
        assert_close(y_ref, (plain.float() + res.float()).to(dtype) if res is not None else plain,
                     name="reference = mask, conv, add")


def test_input_channel_split():
    """Short chunks split the input channels (deterministic last-arrival reduction): equal to the reference
    and to the unsplit kernel, counters back at zero, and the split sized from the shapes."""
    from omni_rt.kernels import causal_conv1d as cc

    assert cc._split_for(200, 12) == 1 and cc._split_for(24, 1) == 1   # enough programs / one in-block
    assert cc._split_for(24, 12) == 6 and cc._split_for(3, 7) == 7 and cc._split_for(10, 12) == 12
    g = torch.Generator().manual_seed(5)
    c_in, c_out, length = 100, 20, 5
    w = torch.randn(c_out, c_in, 7, generator=g) / (7 * c_in) ** 0.5
    bias, res = torch.randn(c_out, generator=g), torch.randn(3, c_out, length, generator=g)
    x = torch.randn(3, c_in, length, generator=g)
    state = torch.randn(3, c_in, 18, generator=g)
    sn = dict(snake_alpha=0.3 * torch.randn(c_in, generator=g), snake_beta=0.3 * torch.randn(c_in, generator=g))
    pre = (torch.tensor([0, 2, 9]), 4, 2)
    kw = dict(bias=bias, dilation=3, state=state, return_state=True, residual=res, pre_start=pre, **sn)
    y_ref, st_ref = causal_conv1d_ref(x, w, **kw)
    with force_triton():
        outs = {sp: cc._causal_conv1d_triton(x, w, bias, 3, 1, state, sn["snake_alpha"], sn["snake_beta"], True,
                                             None, None, res, pre, split=sp) for sp in (None, 1, 3)}
    for sp, (y, st) in outs.items():
        assert_close(y, y_ref, name=f"y split={sp}")
        _check_state(st, st_ref, snake=True)
    assert_close(outs[None][0], outs[1][0], atol=1e-6, rtol=1e-6, name="split vs unsplit")
    assert int(cc._COUNTERS[torch.device("cpu")].abs().sum()) == 0, "tile counters must return to zero"


def test_empty_and_width_one_state():
    p, c_in = _params("dense", torch.float32, snake=True)
    state = torch.randn(2, c_in, 6)
    y, st = _triton(torch.randn(2, c_in, 0), state=state, return_state=True, **p)
    assert y.shape == (2, 20, 0) and torch.equal(st, state)          # nothing new: the state is unchanged
    y, st = _triton(torch.randn(0, c_in, 5), return_state=True, **p)
    assert y.shape == (0, 20, 5) and st.shape == (0, c_in, 6)
    pw, c = _params("pointwise", torch.float32)
    y, st = _triton(torch.randn(2, c, 5), return_state=True, **pw)
    assert st.shape == (2, c, 0)


def test_cpu_dispatch_uses_reference_and_honours_out():
    p, c_in = _params("dense", torch.float32, snake=True)
    x = torch.randn(2, c_in, 33)
    state = torch.randn(2, c_in, 6)
    out, state_out = torch.empty(2, 20, 33), torch.empty(2, c_in, 6)
    with force_triton(False):
        y, st = causal_conv1d(x, state=state, return_state=True, out=out, state_out=state_out, **p)
    y_ref, st_ref = causal_conv1d_ref(x, state=state, return_state=True, **p)
    assert y is out and st is state_out
    assert torch.equal(y, y_ref) and torch.equal(st, st_ref)


def test_validation_errors():
    p, c_in = _params("dense", torch.float32)
    x = torch.randn(2, c_in, 9)
    with pytest.raises(ValueError, match="state must be"):
        causal_conv1d(x, state=torch.zeros(2, c_in, 5), **p)
    with pytest.raises(ValueError, match="share one of"):
        causal_conv1d(x.half(), **p)
    with pytest.raises(ValueError, match="both snake_alpha and snake_beta"):
        causal_conv1d(x, snake_alpha=torch.zeros(c_in), **p)
    with pytest.raises(ValueError, match="does not fit"):
        causal_conv1d(x, p["weight"], groups=5)
    with pytest.raises(ValueError, match="only dense"):
        _triton(x, torch.randn(24, 3, 7), groups=8)
    state = torch.zeros(2, c_in, 6)
    with pytest.raises(ValueError, match="alias"):
        _triton(x, state=state, state_out=state, return_state=True, **p)


# ------------------------------------------------------------------------- reference vs transformers
@pytest.mark.oracle
@pytest.mark.parametrize("length", [1, 7, 151])
def test_reference_matches_transformers(length):
    """The reference's semantics are the oracle's: causal conv class (dense d1/3/9, depthwise, k1, 96->1
    shaped) with SnakeBeta before it, random weights, fp32."""
    mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    c = 12
    configs = [(c, c, 7, d, 1) for d in (1, 3, 9)] + [(c, c, 7, 1, c), (c, 2 * c, 1, 1, 1), (c, 1, 7, 1, 1)]
    for c_in, c_out, k, d, g in configs:
        conv = mod.Qwen3OmniMoeCausalConvNet(c_in, c_out, k, dilation=d, groups=g)
        snake = mod.Qwen3OmniMoeSnakeBeta(c_in)
        with torch.no_grad():
            snake.alpha.normal_(0, 0.5)
            snake.beta.normal_(0, 0.5)
        assert snake.no_div_by_zero == SNAKE_EPS
        x = torch.randn(2, c_in, length)
        with torch.no_grad():
            expected = conv(snake(x))
            plain = conv(x)
        got = causal_conv1d_ref(x, conv.conv.weight, conv.conv.bias, dilation=d, groups=g,
                                snake_alpha=snake.alpha, snake_beta=snake.beta)
        assert_close(got, expected, atol=1e-6, rtol=1e-5, name=f"conv {c_in}->{c_out} k{k} d{d} g{g}")
        assert_close(causal_conv1d_ref(x, conv.conv.weight, conv.conv.bias, dilation=d, groups=g), plain,
                     atol=1e-6, rtol=1e-5, name="no snake")


@pytest.mark.oracle
def test_reference_streams_a_transformers_residual_unit():
    """A residual unit (snake -> k7 d9 -> snake -> k1, + x) run chunk by chunk through the reference with
    carried state equals transformers' full-sequence module."""
    mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    unit = mod.Qwen3OmniMoeCode2WavDecoderResidualUnit(16, dilation=9)
    with torch.no_grad():
        for act in (unit.act1, unit.act2):
            act.alpha.normal_(0, 0.5)
            act.beta.normal_(0, 0.5)
    x = torch.randn(1, 16, 70)
    with torch.no_grad():
        expected = unit(x)
    state, outs, t = None, [], 0
    for n in (1, 5, 64):
        xc = x[..., t:t + n]
        h, state = causal_conv1d_ref(xc, unit.conv1.conv.weight, unit.conv1.conv.bias, dilation=9, state=state,
                                     return_state=True, snake_alpha=unit.act1.alpha, snake_beta=unit.act1.beta)
        outs.append(causal_conv1d_ref(h, unit.conv2.conv.weight, unit.conv2.conv.bias,
                                      snake_alpha=unit.act2.alpha, snake_beta=unit.act2.beta) + xc)
        t += n
    assert_close(torch.cat(outs, -1).detach(), expected, atol=1e-5, rtol=1e-5, name="residual unit")


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c_in,c_out,width,dilation,groups,length", [
    (768, 768, 7, 9, 1, 32), (96, 96, 7, 3, 1, 1920), (384, 384, 1, 1, 1, 160), (1024, 1536, 7, 1, 1, 4),
    (96, 1, 7, 1, 1, 1920), (1024, 1024, 7, 1, 1024, 64), (192, 192, 7, 1, 1, 1),
])
def test_released_shapes_gpu(dtype, c_in, c_out, width, dilation, groups, length):
    dev = "cuda"
    w = (torch.randn(c_out, c_in // groups, width, device=dev) / (c_in // groups * width) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device=dev).to(dtype)
    alpha, beta = 0.5 * torch.randn(c_in, device=dev), 0.5 * torch.randn(c_in, device=dev)
    snake = dict(snake_alpha=alpha, snake_beta=beta) if groups == 1 else {}
    x = torch.randn(2, c_in, length, device=dev).to(dtype)
    state = torch.randn(2, c_in, (width - 1) * dilation, device=dev).to(dtype)
    for weight in (w, prepare_weight(w)):
        y, st = causal_conv1d(x, weight, bias, dilation, groups, state, True, **snake)
        y_ref, st_ref = causal_conv1d_ref(x, w, bias, dilation, groups, state, True, **snake)
        atol, rtol = KERNEL[dtype]
        assert_close(y, y_ref, atol=4 * atol, rtol=rtol, name="y")   # fp32 sums of up to 7168 products
        _check_state(st, st_ref, bool(snake))
    if groups == 1:  # the streaming extras: pre-start mask (a fresh and a running stream) and the residual
        res = torch.randn(2, c_out, length, device=dev).to(dtype)
        pre = (torch.tensor([0, 7], device=dev), length // 2 + 1, 1)
        y = causal_conv1d(x, w, bias, dilation, groups, state, residual=res, pre_start=pre, **snake)
        y_ref = causal_conv1d_ref(x, w, bias, dilation, groups, state, residual=res, pre_start=pre, **snake)
        assert_close(y, y_ref, atol=4 * KERNEL[dtype][0], rtol=KERNEL[dtype][1], name="y residual/pre_start")
    # graph-safety: capture, zero the output, replay
    out = torch.empty_like(y)
    so = torch.empty_like(st)
    causal_conv1d(x, w, bias, dilation, groups, state, True, out=out, state_out=so, **snake)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        causal_conv1d(x, w, bias, dilation, groups, state, True, out=out, state_out=so, **snake)
    out.zero_()
    so.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, y_ref, atol=4 * KERNEL[dtype][0], rtol=KERNEL[dtype][1], name="graph y")
    _check_state(so, st_ref, bool(snake))

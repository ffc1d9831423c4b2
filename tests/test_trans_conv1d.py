"""trans_conv1d: the Triton kernel (interpreter on CPU) vs its PyTorch reference, and chunked streaming with the
carried tail vs one transformers-style transposed conv over the whole sequence."""
import pytest
import torch
import torch.nn.functional as F

from omni_rt.kernels import force_triton
from omni_rt.kernels.causal_conv1d import snake_beta_ref
from omni_rt.kernels.trans_conv1d import prepare_weight, trans_conv1d, trans_conv1d_ref
from tests._tolerances import KERNEL, assert_close


def _params(c_in, c_out, k, dtype, snake, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = dict(weight=(torch.randn(c_in, c_out, k, generator=g) / (c_in * 2) ** 0.5).to(dtype),
             bias=torch.randn(c_out, generator=g).to(dtype))
    if snake:
        p["snake_alpha"] = 0.5 * torch.randn(c_in, generator=g)
        p["snake_beta"] = 0.5 * torch.randn(c_in, generator=g)
    return p


CASES = [
    # c_in, c_out, K, stride, length, snake, dtype
    (24, 20, 16, 8, 1, True, torch.float32),     # decoder block (K = 2s), one input sample
    (20, 12, 10, 5, 7, True, torch.float32),
    (12, 8, 6, 3, 33, True, torch.float16),      # several J blocks
    (16, 16, 2, 2, 3, False, torch.float32),     # the hidden upsampler: K = s, no tail
    (9, 5, 5, 3, 17, False, torch.float16),      # K between s and 2s
    (8, 40, 4, 3, 2, True, torch.float32),       # several out blocks
]


@pytest.mark.parametrize("c_in,c_out,k,stride,length,snake,dtype", CASES)
def test_triton_matches_ref(c_in, c_out, k, stride, length, snake, dtype):
    p = _params(c_in, c_out, k, dtype, snake)
    ov = k - stride
    x = torch.randn(3, c_in, 2 * length + 1).to(dtype)[:, :, 1::2]         # strided time
    tail = torch.randn(3, c_out, ov).to(dtype)
    pos = torch.tensor([0, 1, 500], dtype=torch.int64)
    for pre in (None, (pos, max(length // 2, 1), 1), (pos, length + 2, 2)):
        out_tail = torch.full((3, ov, c_out), float("nan")).to(dtype).transpose(1, 2)   # strided tail_out
        y_ref, t_ref = trans_conv1d_ref(x, stride=stride, tail=tail, pre_start=pre, **p)
        with force_triton():
            y, t = trans_conv1d(x, stride=stride, tail=tail, pre_start=pre, tail_out=out_tail, **p)
        atol, rtol = KERNEL[dtype]
        assert t.data_ptr() == out_tail.data_ptr()
        assert_close(y, y_ref, atol=atol, rtol=rtol, name="y")
        assert_close(t, t_ref, atol=atol, rtol=rtol, name="tail")
    with force_triton():  # no tail given = zeros; prepared weight storage
        y, t = trans_conv1d(x, stride=stride, **dict(p, weight=prepare_weight(p["weight"])))
    y_ref, t_ref = trans_conv1d_ref(x, stride=stride, **p)
    assert_close(y, y_ref, atol=KERNEL[dtype][0], rtol=KERNEL[dtype][1], name="y, no tail")
    assert_close(t, t_ref, atol=KERNEL[dtype][0], rtol=KERNEL[dtype][1], name="tail, no tail")


def test_input_channel_split():
    """One-frame chunks split the input channels (the dense conv's deterministic last-arrival reduction): equal
    to the reference and to the unsplit kernel, counters back at zero, the split sized from the shapes."""
    from omni_rt.kernels import causal_conv1d as cc
    from omni_rt.kernels import trans_conv1d as tc

    assert tc._tiles(1024, 1024, 1, 2, torch.bfloat16, 1)[4] == 3      # released first upsampler: 64 -> 192 CTAs
    assert tc._tiles(768, 384, 32, 5, torch.bfloat16, 1)[4] == 2       # decoder block 2: 120 -> 240 CTAs
    assert tc._tiles(1536, 768, 4, 8, torch.bfloat16, 1)[4] == 1       # 192 CTAs already
    assert tc._tiles(16, 20, 1, 8, torch.float32, 1)[4] == 1           # tiny shapes: one in-block, no split
    c_in, c_out, k, stride, length = 100, 20, 6, 3, 5
    p = _params(c_in, c_out, k, torch.float32, snake=True, seed=3)
    x = torch.randn(3, c_in, length)
    tail = torch.randn(3, c_out, k - stride)
    pre = (torch.tensor([0, 1, 500], dtype=torch.int64), 3, 2)
    y_ref, t_ref = trans_conv1d_ref(x, stride=stride, tail=tail, pre_start=pre, **p)
    with force_triton():
        outs = {sp: trans_conv1d(x, stride=stride, tail=tail, pre_start=pre, split=sp, **p) for sp in (1, 2, 4)}
    for sp, (y, t) in outs.items():
        assert_close(y, y_ref, name=f"y split={sp}")
        assert_close(t, t_ref, name=f"tail split={sp}")
        assert_close(y, outs[1][0], atol=1e-6, rtol=1e-6, name=f"split {sp} vs unsplit")
    assert int(cc._COUNTERS[torch.device("cpu")].abs().sum()) == 0, "tile counters must return to zero"


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 1, 5], [9]])
def test_streaming_equals_transformers_trim(chunks):
    """Chunks with the tail carried = the reference's conv_transpose1d trimmed by K - s on the right (and the
    stream's first K - s samples are the left trim's, see models/code2wav.py)."""
    c_in, c_out, k, s = 6, 5, 8, 4
    p = _params(c_in, c_out, k, torch.float32, snake=True, seed=2)
    x = torch.randn(2, c_in, sum(chunks))
    full = F.conv_transpose1d(snake_beta_ref(x, p["snake_alpha"], p["snake_beta"]), p["weight"], p["bias"],
                              stride=s)[..., :x.shape[-1] * s]
    outs, tail, a = [], None, 0
    for n in chunks:
        with force_triton():
            y, tail = trans_conv1d(x[..., a:a + n], stride=s, tail=tail, **p)
        outs.append(y)
        a += n
    assert_close(torch.cat(outs, -1), full, atol=1e-5, rtol=1e-5, name="streamed")


def test_validation():
    p = _params(4, 3, 4, torch.float32, snake=False)
    x = torch.randn(1, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        trans_conv1d(x, stride=1, **p)
    with pytest.raises(ValueError, match="tail"):
        trans_conv1d(x, stride=2, tail=torch.zeros(1, 3, 3), **p)
    with pytest.raises(ValueError, match="weight"):
        trans_conv1d(torch.randn(1, 5, 5), stride=2, **p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("c_in,c_out,k,s,length,snake", [
    (1024, 1024, 2, 2, 1, False), (1536, 768, 16, 8, 4, True), (768, 384, 10, 5, 32, True),
    (384, 192, 8, 4, 160, True), (192, 96, 6, 3, 640, True), (192, 96, 6, 3, 16000, True),
])
def test_released_shapes_gpu(dtype, c_in, c_out, k, s, length, snake):
    torch.backends.cudnn.allow_tf32 = False
    p = {n: t.cuda() for n, t in _params(c_in, c_out, k, dtype, snake).items()}
    x = torch.randn(2, c_in, length, device="cuda").to(dtype)
    tail = torch.randn(2, c_out, k - s, device="cuda").to(dtype)
    pre = (torch.tensor([0, 9], device="cuda"), 3, 1)
    y_ref, t_ref = trans_conv1d_ref(x.float(), stride=s, tail=tail.float(), pre_start=pre,
                                    **{n: t.float() for n, t in p.items()})
    for w in (p["weight"], prepare_weight(p["weight"])):
        y, t = trans_conv1d(x, stride=s, tail=tail, pre_start=pre, **dict(p, weight=w))
        atol, rtol = KERNEL[dtype]
        assert_close(y.float(), y_ref, atol=4 * atol, rtol=rtol, name="y")
        assert_close(t.float(), t_ref, atol=4 * atol, rtol=rtol, name="tail")

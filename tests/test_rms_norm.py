"""rms_norm: the Triton kernel (interpreter on CPU) against the reference, with and without the fused residual
add, on odd widths, one row, strided rows (q/k heads sliced from a fused projection) and 3-D inputs."""
import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.rms_norm import rms_norm, rms_norm_ref

from _tolerances import rel_err


def _x(shape, dtype):
    return (torch.randn(shape) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 37), (5, 3, 16), (2, 1), (3, 130)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_ref(dtype, shape, with_residual):
    x = _x(shape, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    res = _x(shape, dtype) if with_residual else None
    want = rms_norm_ref(x, w, 1e-6, res)
    with force_triton():
        got = rms_norm(x, w, 1e-6, res)
    # Two 16-bit roundings (the normalised value, the product) may differ by an ulp each: the statistics' summation
    # order differs, and Triton's CPU interpreter truncates 16-bit conversions where the GPU rounds to nearest.
    ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    tol = max(3 * ulp, 1e-6)   # two roundings plus the statistics
    if with_residual:
        # the residual stream is one rounding of x + residual (exact in fp32)
        assert got[1].dtype == dtype and rel_err(got[1].float(), want[1].float()) <= ulp
        got, want = got[0], want[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got.float(), want.float()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 37), (2, 5, 16), (2, 1)])
def test_layer_scaled_residual(dtype, shape):
    """residual + scale·x (Code2Wav's layer scale) fused before the norm: the stream is one rounding of the
    fp32 multiply-add (addcmul), then the same norm."""
    x, res = _x(shape, dtype), _x(shape, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    scale = (0.01 + 0.5 * torch.rand(shape[-1])).to(dtype)
    want_y, want_s = rms_norm_ref(x, w, 1e-6, res, scale)
    assert torch.equal(want_s, torch.addcmul(res, scale, x))
    with force_triton():
        got_y, got_s = rms_norm(x, w, 1e-6, res, scale)
    ulp = {torch.float32: 2 ** -22, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert got_s.dtype == dtype and rel_err(got_s.float(), want_s.float()) <= ulp
    assert rel_err(got_y.float(), want_y.float()) <= max(3 * ulp, 1e-6)
    with pytest.raises(ValueError, match="residual_scale needs a residual"):
        rms_norm(x, w, 1e-6, None, scale)
    with pytest.raises(ValueError, match="residual_scale must be"):
        rms_norm(x, w, 1e-6, res, scale[:-1] if shape[-1] > 1 else torch.ones(2, dtype=dtype))


def test_strided_heads_of_a_fused_projection():
    tokens, heads, kv, hd = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv) * hd + 8)
    q = qkv[:, :heads * hd].view(tokens, heads, hd)
    k = qkv[:, heads * hd:(heads + kv) * hd].view(tokens, kv, hd)
    w = torch.randn(hd)
    for t in (q, k):
        assert not t.is_contiguous()
        with force_triton():
            got = rms_norm(t, w, 1e-6)
        assert rel_err(got, rms_norm_ref(t.contiguous(), w, 1e-6)) <= 1e-6


def test_empty_and_errors():
    w = torch.ones(8)
    with force_triton():
        assert rms_norm(torch.empty(0, 8), w, 1e-6).shape == (0, 8)
        y, s = rms_norm(torch.empty(0, 8), w, 1e-6, torch.empty(0, 8))
        assert y.shape == s.shape == (0, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.ones(2, 8), w, 1e-6, torch.ones(2, 7))


def test_ref_is_the_models_norm():
    # The reference is transformers' Qwen3 RMSNorm op for op (fp32 statistics, weight times the rounded value).
    x = _x((3, 64), torch.bfloat16)
    w = torch.randn(64).to(torch.bfloat16)
    h = x.float()
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(rms_norm_ref(x, w, 1e-6), want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048), (75, 2048), (8, 32, 128)])
def test_gpu_matches_ref(shape):
    x = _x(shape, torch.bfloat16).cuda()
    res = _x(shape, torch.bfloat16).cuda()
    w = (1 + 0.1 * torch.randn(shape[-1])).to(torch.bfloat16).cuda()
    y, s = rms_norm(x, w, 1e-6, res)
    y_ref, s_ref = rms_norm_ref(x, w, 1e-6, res)
    assert torch.equal(s, s_ref)
    assert rel_err(y.float(), y_ref.float()) <= 1e-2
    scale = (0.01 + torch.rand(shape[-1])).to(torch.bfloat16).cuda()   # Code2Wav's layer-scaled residual
    y, s = rms_norm(x, w, 1e-6, res, scale)
    y_ref, s_ref = rms_norm_ref(x, w, 1e-6, res, scale)
    assert rel_err(s.float(), s_ref.float()) <= 2 ** -7
    assert rel_err(y.float(), y_ref.float()) <= 1e-2

"""kernels/fp8_linear.py under the interpreter: weight-only (FP8 codes dequantized in the K loop) and w8a8
(per-token-group activation quantization), odd sizes, size 1, empty batch, strided inputs, against the
references; the references against plain dequantize-then-matmul; launcher validation."""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels import fp8_linear as fl
from omni_rt.quant import dequantize_blockwise, quantize_blockwise, quantize_parts

from _tolerances import assert_close

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _weights(n, k, device):
    return quantize_blockwise(torch.randn(n, k, device=device) / k ** 0.5)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 200, 300), (7, 130, 129), (33, 64, 256), (5, 257, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_only_matches_reference(m, n, k, dtype, device):
    q, s = _weights(n, k, device)
    x = torch.randn(m, k, device=device).to(dtype)
    with force_triton():
        out = fl.fp8_linear(x, q, s, config=SMALL)
    ref = fl.fp8_linear_ref(x, q, s)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref, name=f"fp8_linear {m}x{n}x{k} {dtype}")
    # the reference is dequantize-then-matmul in x's dtype
    assert torch.equal(ref, torch.nn.functional.linear(x, dequantize_blockwise(q, s, dtype)))


@pytest.mark.parametrize("m,n,k", [(1, 130, 129), (9, 64, 300), (20, 200, 128)])
def test_w8a8_matches_reference(m, n, k, device):
    q, s = _weights(n, k, device)
    x = torch.randn(m, k, device=device)
    with force_triton():
        out = fl.fp8_linear(x, q, s, act_fp8=True, config=SMALL)
    ref = fl.fp8_linear_ref(x, q, s, act_fp8=True)
    assert_close(out, ref, name="w8a8")
    # w8a8 is the weight-only result up to activation rounding (e4m3: ≤ 2**-4 relative per element)
    wo = fl.fp8_linear_ref(x, q, s)
    assert (ref - wo).abs().max() <= 0.1 * wo.abs().max()


def test_strided_input_leading_dims_bias_and_empty(device):
    q, s = _weights(70, 150, device)
    base = torch.randn(2, 9, 170, device=device)
    x = base[:, 1:8, 10:160]                       # non-contiguous, 3-D
    bias = torch.randn(70, device=device)
    with force_triton():
        out = fl.fp8_linear(x, q, s, bias=bias, config=SMALL)
        empty = fl.fp8_linear(torch.zeros(0, 150, device=device), q, s)
    assert out.shape == (2, 7, 70) and empty.shape == (0, 70)
    assert_close(out, fl.fp8_linear_ref(x, q, s, bias), name="strided")


def test_default_configs_divide_the_scale_block(device):
    q, s = _weights(40, 300, device)
    x = torch.randn(3, 300, device=device)
    for m in (1, 64, 4096):
        for act in (False, True):
            assert 128 % fl.get_config(m, torch.bfloat16, act)["BLOCK_K"] == 0
    with force_triton():
        out = fl.fp8_linear(x, q, s)            # config=None: get_config
    assert_close(out, fl.fp8_linear_ref(x, q, s), name="default config")


@pytest.mark.parametrize("m,k", [(1, 1), (3, 128), (5, 300)])
def test_per_token_group_quant_matches_reference(m, k, device):
    x = torch.randn(m, k, device=device) * 4
    x[0, 0] = 124.3 * (x[0].abs().max() / 448)     # a value whose rounding carries into the exponent
    with force_triton():
        q, s = fl.per_token_group_quant(x)
    q2, s2 = fl.per_token_group_quant_ref(x)
    assert torch.equal(s, s2)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


def test_launcher_validation():
    q, s = _weights(40, 60, "cpu")
    x = torch.randn(2, 60)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fl.fp8_linear(x, q.float(), s)
    with pytest.raises(ValueError, match="scale"):
        fl.fp8_linear(x, q, s[:, :0])
    with pytest.raises(ValueError, match="last dim"):
        fl.fp8_linear(x[:, :50], q, s)
    with pytest.raises(ValueError, match="BLOCK_K"), force_triton():
        fl.fp8_linear(x, q, s, config=dict(SMALL, BLOCK_K=48))


@pytest.mark.parametrize("parts", [(72, 24, 24), (130, 40, 40), (128, 256, 1), (200, 200), (257,)])
@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize("act_fp8", [False, True])
def test_fused_parts_keep_their_own_scale_grids(parts, m, act_fp8, device):
    """A fused q/k/v (gate/up) weight whose parts were quantized each on its own grid, widths not multiples of
    128 (partial edge blocks that do not line up with the fused rows): the kernel maps rows to their part's
    scale rows; equal to the parts computed one by one and to dequantize-by-parts then matmul."""
    k = 136
    w = torch.randn(sum(parts), k, device=device) / k ** 0.5
    q, s = quantize_parts(w, parts)
    x = torch.randn(m, k, device=device)
    with force_triton():
        out = fl.fp8_linear(x, q, s, act_fp8=act_fp8, config=SMALL, parts=parts)
    ref = fl.fp8_linear_ref(x, q, s, act_fp8=act_fp8, parts=parts)
    assert_close(out, ref, name=f"fused {parts}")
    if not act_fp8:
        assert torch.equal(ref, torch.nn.functional.linear(x, dequantize_blockwise(q, s, x.dtype, parts=parts)))
    # the parts one by one (each its own GEMM: only the summation blocking may differ)
    one_by_one = torch.cat([fl.fp8_linear_ref(x, *quantize_blockwise(p), act_fp8=act_fp8)
                            for p in w.split(list(parts))], dim=-1)
    assert_close(ref, one_by_one, name="fused vs parts")


def test_fused_parts_validation(device):
    q, s = quantize_parts(torch.randn(300, 64, device=device), (150, 150))
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="scale"):
        fl.fp8_linear(x, q, s)                        # 2 scale rows per part: not the unfused (3, 1) grid
    with pytest.raises(ValueError, match="parts"):
        fl.fp8_linear(x, q, s, parts=(150, 149))
    with pytest.raises(ValueError, match="parts"):
        fl.fp8_linear(x, q, s, parts=(75, 75, 75, 75))
    assert fl.scale_rows(200, (100, 100)) == 2 and fl.scale_rows(200) == 2 and fl.scale_rows(300, (150, 150)) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("act_fp8", [False, True])
def test_fp8_linear_bf16_gpu(m, act_fp8):
    """bf16 on sm_89+/sm_90 at the thinker's q_proj shape, default configs, in and out of a CUDA graph."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights stay FP8 only on sm_89+")
    q, s = _weights(4096, 2048, "cuda")
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    ref = fl.fp8_linear_ref(x, q, s, act_fp8=act_fp8)
    out = fl.fp8_linear(x, q, s, act_fp8=act_fp8)
    assert_close(out, ref, name="bf16 eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fl.fp8_linear(x, q, s, act_fp8=act_fp8)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_close(static, fl.fp8_linear_ref(x, q, s, act_fp8=act_fp8), name="bf16 graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("parts", [(4096, 512, 512), (2048, 256, 256), (3000, 520, 520)])
def test_fused_qkv_fp8_linear_gpu(parts):
    """The thinker's / talker's fused q/k/v shape (and one whose parts straddle 128-row blocks), decode M=1."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 weights stay FP8 only on sm_89+")
    k = 2048
    q, s = quantize_parts(torch.randn(sum(parts), k, device="cuda") / k ** 0.5, parts)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    assert_close(fl.fp8_linear(x, q, s, parts=parts), fl.fp8_linear_ref(x, q, s, parts=parts), name="fused qkv")

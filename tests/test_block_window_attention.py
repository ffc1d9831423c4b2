"""block_window_attention: the Triton kernel (interpreter on CPU) against the per-window fp32 reference.

Covers odd window sizes (1, 7, 13, 26, 104), many windows per launch, empty windows, views of a fused qkv
buffer (token stride > heads*head_dim, storage offset), head_dim 16/64/80 (80 exercises the padded head
dim), fp32 and fp16; plus the transformers eager loop as a second truth and the launcher's ValueErrors.
"""
from __future__ import annotations

import pytest
import torch

from _tolerances import KERNEL, assert_close
from omni_rt.kernels import force_triton
from omni_rt.kernels.block_window_attention import block_window_attention, block_window_attention_ref


def _cu(lengths: list[int], device="cpu") -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _fused_qkv(tokens: int, heads: int, head_dim: int, dtype, device, offset: int = 3, pad: int = 5):
    """q, k, v as views of one (offset + tokens, 3, heads, head_dim + pad) buffer: strided, offset storage."""
    buf = torch.randn(offset + tokens, 3, heads, head_dim + pad, dtype=dtype, device=device)
    return tuple(buf[offset:, i, :, :head_dim] for i in range(3))


def _check(q, k, v, cu, scale=None):
    with force_triton():
        out = block_window_attention(q, k, v, cu, scale)
    expected = block_window_attention_ref(q, k, v, cu, scale)
    assert out.is_contiguous() and out.dtype == q.dtype
    if q.dtype == torch.float32:
        assert_close(out, expected, name="out")
    else:
        # Three-way budget: the kernel may be off the fp32 truth by about what same-dtype torch is.
        same_dtype = block_window_attention_ref(q, k, v, cu, scale, upcast=False)
        err_kernel = (out.float() - expected.float()).abs().max().item()
        err_torch = (same_dtype.float() - expected.float()).abs().max().item()
        atol, _ = KERNEL[q.dtype]
        assert err_kernel <= 2 * err_torch + atol, f"kernel err {err_kernel:.3g} vs torch {err_torch:.3g}"
        assert_close(out, expected, name="out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 80])
def test_odd_windows_strided(dtype, head_dim, device):
    lengths = [1, 7, 26, 104, 13]
    q, k, v = _fused_qkv(sum(lengths), 2, head_dim, dtype, device)
    assert not q.is_contiguous() and q.storage_offset() > 0
    _check(q, k, v, _cu(lengths, device))


def test_many_windows_released_heads(device):
    # Released layout: 20 heads x 64, full 104-token windows plus a short tail window, one launch.
    lengths = [104, 104, 1, 52]
    q, k, v = _fused_qkv(sum(lengths), 20, 64, torch.float16, device, offset=0, pad=0)
    _check(q, k, v, _cu(lengths, device))


def test_many_small_windows_and_empty_windows(device):
    # 24 windows in one launch, including zero-length windows the kernel must skip.
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 20, (24,), generator=gen).tolist()
    lengths[3] = 0
    lengths[17] = 0
    q, k, v = (torch.randn(sum(lengths), 2, 32, device=device) for _ in range(3))
    _check(q, k, v, _cu(lengths, device), scale=0.3)


def test_window_longer_than_two_blocks(device):
    # 150 tokens crosses two key/query block boundaries (64-wide tiles); single window.
    q, k, v = (torch.randn(150, 1, 64, device=device) for _ in range(3))
    _check(q, k, v, _cu([150], device))


def test_max_seqlen_given_skips_host_sync(device):
    # Same answer when the caller passes the longest window (no cu_seqlens copy to the host).
    lengths = [26, 104, 7]
    q, k, v = _fused_qkv(sum(lengths), 2, 64, torch.float16, device)
    cu = _cu(lengths, device)
    with force_triton():
        out = block_window_attention(q, k, v, cu, max_seqlen=104)
        synced = block_window_attention(q, k, v, cu)
    torch.testing.assert_close(out, synced, atol=0, rtol=0)


def test_single_token_and_empty(device):
    q, k, v = (torch.randn(1, 2, 16, device=device) for _ in range(3))
    with force_triton():
        out = block_window_attention(q, k, v, _cu([1], device))
    # One key: attention returns v exactly.
    assert_close(out, v, name="single token")
    e = torch.empty(0, 2, 16, device=device)
    for cu in (_cu([], device), _cu([0, 0], device)):
        with force_triton():
            assert block_window_attention(e, e, e, cu).shape == (0, 2, 16)


@pytest.mark.oracle
def test_matches_transformers_eager_loop(device):
    # What modeling_qwen3_omni_moe's audio attention does without flash attention: split by cu_seqlens,
    # run eager attention per window in (1, heads, window, head_dim) layout, concatenate.
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import eager_attention_forward

    lengths = [13, 104, 7]
    q, k, v = (torch.randn(sum(lengths), 4, 64, device=device) for _ in range(3))
    cu = _cu(lengths, device)
    module = torch.nn.Module()
    module.training = False
    module.num_key_value_groups = 1
    splits = [torch.split(t.transpose(0, 1).unsqueeze(0), lengths, dim=2) for t in (q, k, v)]
    outs = [eager_attention_forward(module, qs, ks, vs, attention_mask=None, scaling=64 ** -0.5, dropout=0.0)[0]
            for qs, ks, vs in zip(*splits)]
    expected = torch.cat(outs, dim=1)[0]
    with force_triton():
        out = block_window_attention(q, k, v, cu)
    assert_close(out, expected, atol=2e-5, rtol=2e-5, name="vs transformers eager")


def test_cpu_dispatch_uses_reference(device):
    if device != "cpu":
        pytest.skip("CPU dispatch only")
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    cu = _cu([4, 5])
    with force_triton(False):
        out = block_window_attention(q, k, v, cu)
    torch.testing.assert_close(out, block_window_attention_ref(q, k, v, cu), atol=0, rtol=0)


@pytest.mark.parametrize("case,match", [
    ("cu_dtype", "int32"),
    ("cu_end", "end at tokens"),
    ("cu_order", "non-decreasing"),
    ("shape", r"shapes differ"),
    ("rank", r"\(tokens, heads, head_dim\)"),
    ("head_dim", "head_dim must be"),
    ("last_stride", "unit stride"),
    ("dtype", "fp16/bf16/fp32"),
])
def test_validation(case, match, device):
    q, k, v = (torch.randn(10, 2, 16, device=device) for _ in range(3))
    cu = _cu([4, 6], device)
    if case == "cu_dtype":
        cu = cu.long()
    elif case == "cu_end":
        cu = _cu([4, 5], device)
    elif case == "cu_order":
        cu = torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=device)
    elif case == "shape":
        k = k[:9]
    elif case == "rank":
        q = q.reshape(10, 32)
    elif case == "head_dim":
        q, k, v = (torch.randn(10, 2, 144, device=device) for _ in range(3))
    elif case == "last_stride":
        q = torch.randn(10, 16, 2, device=device).transpose(1, 2)
    elif case == "dtype":
        q, k, v = (t.double() for t in (q, k, v))
    with force_triton(), pytest.raises(ValueError, match=match):
        block_window_attention(q, k, v, cu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_released_shapes(dtype, head_dim):
    # bf16 dots only run on the GPU; 30 s of audio = 390 tokens = 3 full windows + a 78-token tail.
    lengths = [104] * 3 + [78]
    q, k, v = _fused_qkv(sum(lengths), 20, head_dim, dtype, "cuda")
    _check(q, k, v, _cu(lengths, "cuda"))

"""qk_norm_rope: the fused per-head q/k RMSNorm + rotary + paged K/V write (interpreter on CPU) against the
unfused reference; odd head counts, one token, strided q/k/v views of a fused projection, skipped slots, and
M-RoPE tables from fractional float positions."""
import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from omni_rt.models.layers import Rotary, apply_rotary, RMSNorm

from _tolerances import rel_err

ULP = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _inputs(tokens, heads, kv_heads, d, dtype, mrope=False):
    width = (heads + 2 * kv_heads) * d + 8
    qkv = (torch.randn(tokens, width) * 2).to(dtype)
    q = qkv[:, :heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:(heads + 2 * kv_heads) * d].view(tokens, kv_heads, d)
    rot = Rotary(d, 10000.0, (d // 4, d // 8, d // 8) if mrope else None)
    pos = torch.rand(3, tokens) * 50 if mrope else torch.arange(tokens).float() + 7   # fractional (video) positions
    cos, sin = rot(pos, dtype)
    qw = (1 + 0.1 * torch.randn(d)).to(dtype)
    kw = (1 + 0.1 * torch.randn(d)).to(dtype)
    return q, k, v, qw, kw, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,d,block_size", [
    (1, 4, 2, 16, 16), (9, 5, 3, 8, 4), (13, 8, 2, 64, 5), (3, 2, 2, 6, 3)])
@pytest.mark.parametrize("mrope", [False, True])
def test_triton_matches_ref(dtype, tokens, heads, kv_heads, d, block_size, mrope):
    q, k, v, qw, kw, cos, sin = _inputs(tokens, heads, kv_heads, d, dtype, mrope)
    blocks = tokens // block_size + 3
    slots = torch.randperm(blocks * block_size)[:tokens]
    slots[1::3] = -1
    base = torch.randn(blocks, block_size, kv_heads, d).to(dtype)
    ref_cache = (base.clone(), -base.clone())
    tri_cache = (base.clone(), -base.clone())
    q_ref, k_ref = qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, ref_cache, slots)
    with force_triton():
        q_tri, k_tri = qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, tri_cache, slots)
    # the norm (2 roundings), both rotary products and their sum: the interpreter truncates 16-bit conversions
    tol = max(5 * ULP[dtype], 1e-6)
    assert rel_err(q_tri.float(), q_ref.float()) <= tol
    assert rel_err(k_tri.float(), k_ref.float()) <= tol
    assert rel_err(tri_cache[0].float(), ref_cache[0].float()) <= tol
    assert torch.equal(tri_cache[1], ref_cache[1])            # v is copied as is
    skipped = slots < 0
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[~skipped]] = False
    assert torch.equal(tri_cache[0].flatten(0, 1)[untouched], base.flatten(0, 1)[untouched])


def test_without_cache_and_empty():
    q, k, v, qw, kw, cos, sin = _inputs(5, 4, 2, 16, torch.float32)
    with force_triton():
        q_tri, k_tri = qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin)
        e = qk_norm_rope(q[:0], k[:0], v[:0], qw, kw, 1e-6, cos[:0], sin[:0])
    q_ref, k_ref = qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin)
    assert rel_err(q_tri, q_ref) <= 1e-6 and rel_err(k_tri, k_ref) <= 1e-6
    assert e[0].shape == (0, 4, 16) and e[1].shape == (0, 2, 16)
    with pytest.raises(ValueError, match="even"):
        qk_norm_rope(q[..., :15], k[..., :15], v[..., :15], qw[:15], kw[:15], 1e-6, cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope(q, k, v, qw, kw, 1e-6, cos[:4], sin[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_shared_by_batch_major_rows(dtype):
    """tokens = B·T rows (batch-major) with one (T, head_dim) table: row r takes table row r % T."""
    b, t = 3, 2
    q, k, v, qw, kw, cos, sin = _inputs(b * t, 4, 2, 16, dtype)
    cos_t, sin_t = cos[:t], sin[:t]
    want = qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos_t.repeat(b, 1), sin_t.repeat(b, 1))
    assert all(torch.equal(a, w) for a, w in zip(qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos_t, sin_t), want))
    with force_triton():
        got = qk_norm_rope(q, k, v, qw, kw, 1e-6, cos_t, sin_t)
    tol = max(5 * ULP[dtype], 1e-6)
    assert rel_err(got[0].float(), want[0].float()) <= tol and rel_err(got[1].float(), want[1].float()) <= tol


def test_ref_equals_the_model_ops():
    # The reference is the attention front as the model ran it before: RMSNorm modules, then apply_rotary.
    q, k, v, qw, kw, cos, sin = _inputs(6, 4, 2, 16, torch.bfloat16, mrope=True)
    qn, kn = RMSNorm(16, 1e-6), RMSNorm(16, 1e-6)
    qn.weight.data, kn.weight.data = qw.clone(), kw.clone()
    with torch.no_grad():
        want_q = apply_rotary(qn(q), cos, sin)
        want_k = apply_rotary(kn(k), cos, sin)
    got_q, got_k = qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 75])
def test_gpu_matches_ref(tokens):
    q, k, v, qw, kw, cos, sin = (t.cuda() for t in _inputs(tokens, 32, 4, 128, torch.bfloat16, mrope=True))
    blocks = tokens // 16 + 2
    slots = torch.randperm(blocks * 16, device="cuda")[:tokens]
    caches = [torch.zeros(blocks, 16, 4, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    q_ref, k_ref = qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, caches[:2], slots)
    q_tri, k_tri = qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, caches[2:], slots)
    assert rel_err(q_tri.float(), q_ref.float()) <= 3 * 2 ** -8
    assert rel_err(k_tri.float(), k_ref.float()) <= 3 * 2 ** -8
    assert torch.equal(caches[3], caches[1])

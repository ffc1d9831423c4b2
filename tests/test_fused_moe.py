"""Fused MoE: forced-Triton (interpreter on CPU) vs the loop-over-experts reference, routing vs transformers'
router math, alignment invariants and graph-safety, config table lookup."""
from __future__ import annotations

import json

import pytest
import torch

from omni_rt.kernels import fused_moe as fm
from omni_rt.kernels import force_triton
from _tolerances import assert_close

# Small tiles so the odd sizes below cross several K and N tiles (and a ragged last tile) in the interpreter.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _weights(e, hidden, inter, dtype, device, scale=0.1):
    gate_up = (torch.randn(e, 2 * inter, hidden, device=device) * scale).to(dtype)
    down = (torch.randn(e, hidden, inter, device=device) * scale).to(dtype)
    return gate_up, down


def _routing(m, e, top_k, dtype, device, skip_experts=()):
    logits = torch.randn(m, e, device=device)
    for s in skip_experts:  # experts that receive no token
        logits[:, s] = -1e4
    return fm.route(logits.to(dtype), top_k, norm_topk_prob=True)


def _check(m, e, top_k, hidden, inter, dtype, device, config=SMALL, skip_experts=(), sliced=False):
    gate_up, down = _weights(e, hidden, inter, dtype, device)
    if sliced:  # x with a storage offset and a row stride wider than the hidden size
        x = torch.randn(m + 3, hidden + 24, device=device).to(dtype)[2:2 + m, 7:7 + hidden]
    else:
        x = torch.randn(m, hidden, device=device).to(dtype)
    weights, ids = _routing(m, e, top_k, dtype, device, skip_experts)
    with force_triton():
        out = fm.fused_moe(x, gate_up, down, weights, ids, config=config)
    ref = fm.fused_moe_ref(x, gate_up, down, weights, ids)
    assert out.dtype == x.dtype
    assert_close(out, ref, name=f"fused_moe m={m} e={e} k={top_k} {dtype}")
    return ids


@pytest.mark.parametrize("m,e,top_k,hidden,inter", [
    (1, 6, 2, 64, 32),      # single decode token
    (7, 10, 3, 72, 40),     # odd M, E not a power of two, H/I not multiples of the tiles
    (33, 6, 6, 48, 24),     # M > BLOCK_M: experts span several blocks
    (5, 8, 8, 40, 48),      # top-k = E: every expert gets every token
    (4, 10, 1, 32, 32),     # top-1: most experts empty (decode kernels: 4 < 10)
    (3, 10, 3, 72, 40),     # M*k = 9 = E-1: the decode kernels (GEMVs, sum folded in)
    (2, 10, 5, 72, 40),     # M*k = 10 = E: the grouped GEMMs
    (1, 130, 8, 136, 24),   # thinker-like decode: E not a power of two, K crosses a 128-tile boundary
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(m, e, top_k, hidden, inter, dtype, device):
    _check(m, e, top_k, hidden, inter, dtype, device)


def test_fused_moe_sliced_input_and_empty_experts(device):
    ids = _check(9, 10, 2, 56, 40, torch.float32, device, skip_experts=(0, 3, 9), sliced=True)
    assert not torch.isin(torch.tensor([0, 3, 9], device=device), ids).any()


def test_fused_moe_table_config(device):
    # config=None goes through get_config (nearest M in the shipped table, fitted to fp32).
    _check(3, 6, 2, 64, 32, torch.float32, device, config=None)


def test_fused_moe_empty_batch(device):
    gate_up, down = _weights(4, 32, 16, torch.float32, device)
    x = torch.zeros(0, 32, device=device)
    ids = torch.zeros(0, 2, dtype=torch.int64, device=device)
    with force_triton():
        out = fm.fused_moe(x, gate_up, down, torch.zeros(0, 2, device=device), ids, config=SMALL)
    assert out.shape == (0, 32)


def _shared_as_experts(gate_up, down, sg, su, sd, parts):
    """The shared expert (gate/up (Is, H), down (H, Is)) as ``parts`` more experts of the routed width I =
    Is / parts, appended to the stacks (SwiGLU splits over the intermediate dimension exactly)."""
    inter = gate_up.shape[1] // 2
    extra_gu = torch.stack([torch.cat([sg[p * inter:(p + 1) * inter], su[p * inter:(p + 1) * inter]])
                            for p in range(parts)])
    extra_dn = torch.stack([sd[:, p * inter:(p + 1) * inter] for p in range(parts)])
    return torch.cat([gate_up, extra_gu]), torch.cat([down, extra_dn])


def _hf_block_cfg():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerTextConfig

    return Qwen3OmniMoeTalkerTextConfig(hidden_size=48, moe_intermediate_size=24, num_experts=6,
                                        num_experts_per_tok=3, shared_expert_intermediate_size=48,
                                        norm_topk_prob=True, hidden_act="silu")


@pytest.mark.oracle
@pytest.mark.parametrize("tokens", [1, 10])   # decode kernels (1*5 < 8), grouped GEMMs
def test_talker_block_matches_transformers(tokens, device):
    """The whole talker sparse-MoE block against transformers, computed as models.moe runs it: the shared
    expert as two more experts, its gate as one more router row whose sigmoid ``route`` returns as their weight."""
    mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    cfg = _hf_block_cfg()
    block = mod.Qwen3OmniMoeTalkerTextSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(1, tokens, cfg.hidden_size, device=device)
        expected = block(x).reshape(-1, cfg.hidden_size)
        flat = x.reshape(-1, cfg.hidden_size)
        se = block.shared_expert
        parts = cfg.shared_expert_intermediate_size // cfg.moe_intermediate_size
        gate_up, down = _shared_as_experts(block.experts.gate_up_proj, block.experts.down_proj,
                                           se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight, parts)
        router = torch.cat([block.gate.weight, block.shared_expert_gate.weight])
        args = (flat, gate_up, down) + fm.route(flat @ router.t(), cfg.num_experts_per_tok, True, num_shared=parts)
        ref = fm.fused_moe_ref(*args)
        with force_triton():
            weights, ids = fm.route(flat @ router.t(), cfg.num_experts_per_tok, True, num_shared=parts)
            got = fm.fused_moe(flat, gate_up, down, weights, ids, config=SMALL)
    assert_close(ref, expected, atol=1e-6, rtol=1e-6, name="reference vs transformers")
    assert_close(got, expected, name="triton vs transformers")


@pytest.mark.parametrize("m,e,top_k,shared", [(1, 128, 6, 2), (5, 10, 3, 1), (3, 6, 6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_shared_experts(m, e, top_k, shared, dtype):
    """num_shared: the extra logit column's sigmoid weighs experts E..E+S-1 after the routed top-k."""
    logits = (torch.randn(m, e + 1) * 2).to(dtype)
    want_w, want_ids = fm.route_ref(logits[:, :e], top_k, True)
    w, ids = fm.route_ref(logits, top_k, True, num_shared=shared)
    assert w.shape == ids.shape == (m, top_k + shared) and w.dtype == dtype and ids.dtype == torch.int64
    assert torch.equal(ids[:, :top_k], want_ids) and torch.equal(w[:, :top_k], want_w)
    assert torch.equal(ids[:, top_k:], torch.arange(e, e + shared).expand(m, shared))
    assert torch.equal(w[:, top_k:], torch.sigmoid(logits[:, e:]).expand(m, shared))
    with force_triton():
        tw, tids = fm.route(logits, top_k, True, num_shared=shared)
    assert torch.equal(tids, ids)
    # one 16-bit rounding (Triton's CPU interpreter truncates where the GPU rounds to nearest)
    tol = 0 if dtype == torch.float32 else 2 ** -7
    assert (tw.float() - w.float()).abs().max() <= max(tol, 1e-6)


@pytest.mark.parametrize("top_k", [1, 4, 8])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_router_math(top_k, norm, device):
    logits = torch.randn(11, 10, device=device, dtype=torch.float16)
    weights, ids = fm.route(logits, top_k, norm)
    probs = torch.softmax(logits.float(), dim=-1)
    top, want_ids = torch.topk(probs, top_k, dim=-1)
    if norm:
        top = top / top.sum(-1, keepdim=True)
    assert weights.dtype == torch.float16 and ids.shape == (11, top_k)
    assert torch.equal(ids, want_ids)
    assert torch.equal(weights, top.half())


@pytest.mark.parametrize("m,e,top_k,block_m", [(1, 6, 2, 16), (33, 10, 4, 16), (20, 5, 5, 32), (3, 128, 8, 16)])
def test_moe_align_invariants(m, e, top_k, block_m, device):
    ids = torch.stack([torch.randperm(e, device=device)[:top_k] for _ in range(m)])
    sorted_ids, expert_ids, total = fm.moe_align_ref(ids, e, block_m)
    n = m * top_k
    bound = n + e * (block_m - 1)
    num_blocks = (bound + block_m - 1) // block_m
    # every block the GEMMs load lies inside sorted_ids (no read past its end)
    assert sorted_ids.shape == (num_blocks * block_m,) and sorted_ids.dtype == torch.int32
    assert expert_ids.shape == (num_blocks,) and expert_ids.dtype == torch.int32
    total = int(total.item())
    assert total % block_m == 0 and total <= bound
    flat = ids.reshape(-1)
    real = sorted_ids[sorted_ids < n].long()
    assert torch.equal(torch.sort(real).values, torch.arange(n, device=device))  # each assignment once
    assert (sorted_ids[total:] == n).all()
    blocks = sorted_ids[:total].view(-1, block_m)
    assert (expert_ids[total // block_m:] == -1).all()
    for b, row in enumerate(blocks):  # every real row of a block belongs to that block's expert
        members = row[row < n].long()
        assert members.numel() > 0, "no block is pure padding"
        assert (flat[members] == expert_ids[b]).all()
        assert torch.all(members[1:] > members[:-1])  # stable: token order kept within an expert


@pytest.mark.parametrize("m,e,top_k,block_m,skew", [
    (1, 6, 2, 16, False),      # fewer assignments than experts
    (33, 10, 4, 16, False),    # E not a power of two, several blocks per expert
    (20, 5, 5, 32, False),     # top-k = E
    (75, 128, 8, 16, False),   # thinker prefill shape
    (300, 7, 4, 64, True),     # 1200 assignments: two scan chunks; most to one expert, others empty
    (1, 1, 1, 16, False),      # one expert, one assignment
])
def test_moe_align_triton_equals_reference(m, e, top_k, block_m, skew):
    """One launch, every expert's program writing its group: the very tensors of the sort-based reference."""
    if skew:
        ids = torch.where(torch.rand(m, top_k) < 0.8, 0, torch.randint(0, e - 3, (m, top_k)))
    else:
        ids = torch.stack([torch.randperm(e)[:top_k] for _ in range(m)])
    want = fm.moe_align_ref(ids, e, block_m)
    with force_triton():
        got = fm.moe_align(ids, e, block_m)
        strided = fm.moe_align(torch.cat([ids, ids], 1)[:, :top_k], e, block_m)
    for g, s_, w in zip(got, strided, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
        assert torch.equal(s_, w)


@pytest.mark.parametrize("m,e,top_k", [(1, 128, 8), (7, 10, 3), (4, 6, 6), (2, 5, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_route_triton_matches_reference(m, e, top_k, norm):
    logits = (torch.randn(m, e) * 2).to(torch.bfloat16)
    want_w, want_ids = fm.route_ref(logits, top_k, norm)
    with force_triton():
        w, ids = fm.route(logits, top_k, norm)
    assert torch.equal(ids, want_ids) and w.dtype == want_w.dtype
    # one bf16 rounding (Triton's CPU interpreter truncates where the GPU rounds to nearest)
    assert (w.float() - want_w.float()).abs().max() <= 2 ** -8


def test_moe_align_fullgraph_no_host_sync():
    """Routing + alignment trace as one graph: no .item(), nonzero or data-dependent shapes."""
    torch._dynamo.reset()

    def prep(logits):
        weights, ids = fm.route(logits, 4, True)
        return (weights,) + fm.moe_align(ids, 10, 16)

    compiled = torch.compile(prep, fullgraph=True, backend="eager", dynamic=False)
    logits = torch.randn(7, 10)
    got = compiled(logits)
    want = prep(logits)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert got[1].shape == (-(-(7 * 4 + 10 * 15) // 16) * 16,)
    with force_triton():
        assert [t.shape for t in prep(logits)] == [t.shape for t in want]


def test_launcher_validation():
    gate_up, down = _weights(4, 32, 16, torch.float32, "cpu")
    x = torch.randn(3, 32)
    w, ids = _routing(3, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="down_proj"):
        fm.fused_moe(x, gate_up, down[:, :, :8], w, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fm.fused_moe(x, gate_up, down, w, ids.float())
    with pytest.raises(ValueError, match="share one of"):
        fm.fused_moe(x.half(), gate_up, down, w, ids)
    with pytest.raises(ValueError, match="must both be"):
        fm.fused_moe(x, gate_up, down, w[:2], ids[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_output_independent_of_batch_mates(dtype):
    """Decode kernels: a token's output is bit-identical alone or beside other tokens (no atomics, fixed
    summation order), and the grid holds only working programs."""
    e, top_k, hidden, inter = 16, 3, 72, 40
    gate_up, down = _weights(e, hidden, inter, dtype, "cpu")
    x = torch.randn(5, hidden).to(dtype)
    weights, ids = _routing(5, e, top_k, dtype, "cpu")
    with force_triton():
        together = fm.fused_moe(x, gate_up, down, weights, ids)
        alone = fm.fused_moe(x[2:3], gate_up, down, weights[2:3], ids[2:3])
    assert torch.equal(together[2:3], alone)
    assert_close(together, fm.fused_moe_ref(x, gate_up, down, weights, ids), name="decode batch")


def test_decode_grid_sized_to_the_work():
    """At batch 1 the released shapes spread every decode GEMM over >= DECODE_TARGET_CTAS programs."""
    for e, hidden, inter, k in ((128, 2048, 768, 8), (130, 1024, 384, 8)):   # thinker; talker + 2 shared parts
        assert k * -(-inter // fm.decode_block_n(k, inter)) >= fm.DECODE_TARGET_CTAS
        assert -(-hidden // fm.decode_block_n(1, hidden)) >= fm.DECODE_TARGET_CTAS
    # larger batches keep bigger tiles, never below the minimum
    assert fm.decode_block_n(15, 2048) == fm.DECODE_MAX_BLOCK_N
    assert fm.decode_block_n(1, 16) == fm.DECODE_MIN_BLOCK_N


def test_config_table_nearest_m_and_fit(tmp_path, monkeypatch):
    table = fm._load_table(None)
    assert len(table) > 1
    ms = [m for m, _ in table]
    for m in (1, 5, 100, 3000, 10 ** 6):
        nearest = min(ms, key=lambda k: (abs(k - m), k))
        assert fm.get_config(m, torch.float16) == fm.fit_config(dict(dict(table)[nearest]), torch.float16)
    for m in ms:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            cfg = fm.get_config(m, dtype)
            elem = torch.empty((), dtype=dtype).element_size()
            assert fm._smem_bytes(cfg, elem) <= fm.SMEM_BUDGET
    # A per-device table overrides the default; a missing one falls back to it.
    monkeypatch.setattr(fm, "_CONFIG_DIR", str(tmp_path))
    fm._load_table.cache_clear()
    try:
        assert fm.get_config(1, torch.float16) == fm.DEFAULT_CONFIG
        tuned = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 8, "num_stages": 2}
        (tmp_path / fm._device_file_name("Fake GPU 80GB")).write_text(json.dumps({"_doc": "x", "64": tuned}))
        assert fm.get_config(1, torch.float16, "Fake GPU 80GB") == tuned
    finally:
        fm._load_table.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300])
def test_fused_moe_bf16_cuda_graph(m):
    """bf16 at the thinker's shapes with the shipped configs; also captured in a CUDA graph and replayed."""
    dev = "cuda"
    gate_up, down = _weights(128, 2048, 768, torch.bfloat16, dev, scale=0.02)
    x = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
    weights, ids = _routing(m, 128, 8, torch.bfloat16, dev)
    ref = fm.fused_moe_ref(x, gate_up, down, weights, ids)
    out = fm.fused_moe(x, gate_up, down, weights, ids)
    assert_close(out, ref, name="bf16 eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fm.fused_moe(x, gate_up, down, weights, ids)
    x.copy_(torch.randn_like(x))
    weights2, ids2 = _routing(m, 128, 8, torch.bfloat16, dev)
    weights.copy_(weights2)
    ids.copy_(ids2)
    graph.replay()
    assert_close(static_out, fm.fused_moe_ref(x, gate_up, down, weights, ids), name="bf16 graph replay")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [75, 4096])
def test_moe_align_cuda_equals_reference(m):
    """The one-launch alignment on a GPU (real parallel programs, thousands of assignments): same tensors."""
    _, ids = torch.topk(torch.rand(m, 128, device="cuda"), 8, dim=-1)
    for bm in (16, 64):
        for got, want in zip(fm.moe_align(ids, 128, bm), fm.moe_align_ref(ids, 128, bm)):
            assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_talker_decode_with_shared_parts_cuda(m):
    """bf16 talker shapes with the shared expert as 2 more experts (E=130, 6+2 per token): decode kernels at
    M*8 < 130, grouped GEMMs at M=16, against the reference; batch-1 rows identical inside a batch."""
    dev = "cuda"
    gate_up, down = _weights(130, 1024, 384, torch.bfloat16, dev, scale=0.02)
    x = torch.randn(m, 1024, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(m, 129, device=dev, dtype=torch.bfloat16)
    weights, ids = fm.route(logits, 6, True, num_shared=2)
    assert torch.equal(ids, fm.route_ref(logits, 6, True, num_shared=2)[1])
    out = fm.fused_moe(x, gate_up, down, weights, ids)
    assert_close(out, fm.fused_moe_ref(x, gate_up, down, weights, ids), name="talker bf16")
    if m * 8 < 130:
        assert torch.equal(out[:1], fm.fused_moe(x[:1], gate_up, down, weights[:1], ids[:1]))

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
    (4, 10, 1, 32, 32),     # top-1: most experts empty
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_expert_moe_matches_reference(dtype, device):
    m, e, top_k, hidden, inter, shared_inter = 7, 6, 3, 48, 24, 40
    gate_up, down = _weights(e, hidden, inter, dtype, device)
    x = torch.randn(m, hidden, device=device).to(dtype)
    weights, ids = _routing(m, e, top_k, dtype, device)
    sg = (torch.randn(shared_inter, hidden, device=device) * 0.1).to(dtype)
    su = (torch.randn(shared_inter, hidden, device=device) * 0.1).to(dtype)
    sd = (torch.randn(hidden, shared_inter, device=device) * 0.1).to(dtype)
    gate = (torch.randn(1, hidden, device=device) * 0.1).to(dtype)
    with force_triton():
        out = fm.shared_expert_moe(x, gate_up, down, weights, ids, sg, su, sd, gate, config=SMALL)
    ref = fm.shared_expert_moe_ref(x, gate_up, down, weights, ids, sg, su, sd, gate)
    assert_close(out, ref, name=f"shared_expert_moe {dtype}")


def _hf_block_cfg():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerTextConfig

    return Qwen3OmniMoeTalkerTextConfig(hidden_size=48, moe_intermediate_size=24, num_experts=6,
                                        num_experts_per_tok=3, shared_expert_intermediate_size=40,
                                        norm_topk_prob=True, hidden_act="silu")


@pytest.mark.oracle
def test_talker_block_matches_transformers(device):
    """The whole talker sparse-MoE block (router + experts + gated shared expert) against transformers."""
    mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    cfg = _hf_block_cfg()
    block = mod.Qwen3OmniMoeTalkerTextSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(2, 5, cfg.hidden_size, device=device)
        expected = block(x).reshape(-1, cfg.hidden_size)
        flat = x.reshape(-1, cfg.hidden_size)
        weights, ids = fm.route(flat @ block.gate.weight.t(), cfg.num_experts_per_tok, cfg.norm_topk_prob)
        se = block.shared_expert
        args = (flat, block.experts.gate_up_proj, block.experts.down_proj, weights, ids, se.gate_proj.weight,
                se.up_proj.weight, se.down_proj.weight, block.shared_expert_gate.weight)
        with force_triton():
            got = fm.shared_expert_moe(*args, config=SMALL)
        ref = fm.shared_expert_moe_ref(*args)
    assert_close(ref, expected, atol=1e-6, rtol=1e-6, name="reference vs transformers")
    assert_close(got, expected, name="triton vs transformers")


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
    sorted_ids, expert_ids, total = fm.moe_align(ids, e, block_m, sparse=False)
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


@pytest.mark.parametrize("m,e,top_k,block_m", [(1, 128, 8, 16), (3, 10, 3, 16), (1, 6, 2, 32)])
@pytest.mark.parametrize("triton_path", [False, True])
def test_moe_align_sparse_layout(m, e, top_k, block_m, triton_path):
    """Decode (M*top_k < E): no sort, one block per assignment, a grid of working programs only."""
    ids = torch.stack([torch.randperm(e)[:top_k] for _ in range(m)])
    with force_triton(triton_path):
        sorted_ids, expert_ids, total = fm.moe_align(ids, e, block_m)
    n = m * top_k
    assert sorted_ids.shape == (n * block_m,) and expert_ids.shape == (n,) and int(total) == n * block_m
    blocks = sorted_ids.view(n, block_m)
    assert torch.equal(blocks[:, 0], torch.arange(n, dtype=torch.int32))
    assert (blocks[:, 1:] == n).all()
    assert torch.equal(expert_ids, ids.reshape(-1).to(torch.int32))


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

"""Graph-safety of the thinker decode step, checked on CPU: under ``kernels.graph_safe()`` the whole step
(embed → decoder over the paged KV → lm_head → sampler, metadata given as tensors) traces with
``torch.compile(fullgraph=True)`` — any graph break fails — and matches the eager step on the references.
Also the static torch kernels (``*_static``) against the references on their own."""
from __future__ import annotations

import pytest
import torch

from omni_rt.engine.graphs import ThinkerDecodeGraphs
from omni_rt.engine.kv_cache import KVCachePool
from omni_rt.engine.model_runner import DecoderRunner, text_positions
from omni_rt.kernels import fused_moe as moe
from omni_rt.kernels import graph_safe
from omni_rt.kernels import kv_write as kvw
from omni_rt.kernels import paged_attention as pa
from omni_rt.models.omni import load_model
from omni_rt.request import SamplingParams

from _tolerances import PARITY, assert_close, rel_err

PROMPTS = [[449, 11, 5, 100, 200, 300, 42, 450, 5, 449, 12, 5],
           [449, 11, 5, 7, 8, 9, 10, 300, 301, 302, 17, 18, 19, 20, 21, 22, 23, 450, 5, 449, 12, 5],
           [449, 11, 5, 250, 450, 5, 449, 12, 5]]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu", with_talker=False)


# ---------------------------------------------------------------------------------------- static kernels

def _pages(seed=0, blocks=12, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(blocks + 1, block_size, kv_heads, head_dim + 3, generator=g).to(dtype)
    # Strided views with a storage offset, as layer views of a pool would be.
    return big[1:, :, :, 2:2 + head_dim], torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)


@pytest.mark.parametrize("slots", [[5, -1, 17, 0], [-1, -1, -1], [-1, 9], [3], []])
def test_kv_write_static_equals_reference(slots):
    k_cache, v_cache = _pages()
    g = torch.Generator().manual_seed(1)
    n = len(slots)
    k = torch.randn(n, 2, 16, generator=g)
    v = torch.randn(n, 2, 16, generator=g)
    slot_t = torch.tensor(slots, dtype=torch.int64)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kvw.kv_write_ref(k, v, ref_k, ref_v, slot_t)
    kvw.kv_write_static(k, v, k_cache, v_cache, slot_t.to(torch.int32))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("heads", [2, 6])
def test_paged_decode_attention_static_equals_reference(heads):
    k_cache, v_cache = _pages(seed=2)
    k_cache = k_cache.contiguous()
    q = torch.randn(5, heads, 20)[:, :, 1:17]  # non-contiguous query, head_dim 16
    tables = torch.tensor([[3, 1, -1, -1, -1], [0, 2, 5, 7, 11], [-1] * 5, [4, -1, -1, -1, -1], [6, 8, 9, 10, -1]],
                          dtype=torch.int32)
    lens = torch.tensor([6, 19, 0, 1, 16], dtype=torch.int32)
    ref = pa.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.3)
    ours = pa.paged_decode_attention_static(q, k_cache, v_cache, tables, lens, 0.3)
    assert_close(ours, ref, name="paged_decode_attention_static")
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))  # empty context → zeros


def test_paged_decode_attention_static_ignores_nonfinite_masked_rows():
    k_cache, v_cache = _pages(seed=3)
    k_cache, v_cache = k_cache.contiguous(), v_cache.clone()
    k_cache[0], v_cache[0] = float("inf"), float("nan")  # page 0 is only ever read through padding entries
    q = torch.randn(2, 4, 16)
    tables = torch.tensor([[3, -1], [5, 6]], dtype=torch.int32)
    lens = torch.tensor([2, 7], dtype=torch.int32)
    ours = pa.paged_decode_attention_static(q, k_cache, v_cache, tables, lens)
    assert torch.isfinite(ours).all()
    assert_close(ours, pa.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens))


@pytest.mark.parametrize("m", [1, 5, 0])
def test_fused_moe_static_equals_reference(m):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(m, 40, generator=g)[:, 3:27]  # sliced: (m, 24) with a row stride of 40
    gate_up = torch.randn(7, 20, 24, generator=g) * 0.2
    down = torch.randn(7, 24, 10, generator=g) * 0.2
    weights, ids = moe.route(torch.randn(m, 7, generator=g), 3)
    ref = moe.fused_moe_ref(x, gate_up, down, weights, ids)
    assert_close(moe.fused_moe_static(x, gate_up, down, weights, ids), ref, name="fused_moe_static")
    with graph_safe():
        assert_close(moe.fused_moe(x, gate_up, down, weights, ids), ref, name="fused_moe under graph_safe")


def test_graph_safe_is_scoped():
    from omni_rt.kernels import graph_safe_enabled

    assert not graph_safe_enabled()
    with graph_safe():
        assert graph_safe_enabled()
        with graph_safe(False):
            assert not graph_safe_enabled()
        assert graph_safe_enabled()
    assert not graph_safe_enabled()


# ---------------------------------------------------------------------------------------- the decode step

def _prefilled(model, tap_layer):
    tc = model.cfg.thinker.text
    pool = KVCachePool(tc.num_hidden_layers, 32, 8, tc.num_key_value_heads, tc.head_dim, torch.float32, "cpu")
    runner = DecoderRunner(model.thinker.forward, pool)
    embeds = [model.thinker.embed(torch.tensor(p)) for p in PROMPTS]
    runner.prefill(list(range(len(PROMPTS))), embeds, [text_positions(0, len(p), "cpu") for p in PROMPTS])
    graphs = ThinkerDecodeGraphs(model.thinker, pool, max_batch_size=4, max_model_len=64, use_graphs=False,
                                 tap_layer=tap_layer)
    return pool, graphs


def test_decode_step_compiles_fullgraph_and_matches_eager(model):
    tap_layer = model.cfg.thinker.text.num_hidden_layers  # the residual stream after every layer
    with torch.inference_mode():
        pool, graphs = _prefilled(model, tap_layer)
        params = [SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
                  SamplingParams(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3),
                  SamplingParams(temperature=1.2, top_k=0, top_p=0.5, repetition_penalty=1.0)]
        last = [p[-1] for p in PROMPTS]
        values = graphs.inputs_for([0, 1, 2], last, [len(p) - 1 for p in PROMPTS], params, [0, 3, 7],
                                   [11, 2**40 + 5, 99], seen_ids=PROMPTS)
        view = graphs.runner.view(4)  # batch 3 padded to the bucket of 4: slot -1, context_len 0
        graphs.runner.fill(view, 3, values)
        assert view["slot_mapping"][3] == -1 and view["context_lens"][3] == 0
        eager = graphs.step(view)
        compiled = torch.compile(graphs.step, fullgraph=True, backend="eager")
        with graph_safe():
            traced = compiled(view)  # re-writes the same K/V into the same slots, then reads them
    assert torch.equal(traced["next_ids"][:3], eager["next_ids"][:3])
    assert rel_err(traced["tap"][:3], eager["tap"][:3]) <= PARITY["hidden_rel"]
    assert torch.isfinite(traced["tap"]).all()  # the padding row stays finite too


def test_decode_step_matches_the_eager_runner(model):
    """The step's numbers equal DecoderRunner.decode + logits + sample (what the engine runs on CPU)."""
    from omni_rt.sampling import SamplingTensors, sample

    tap_layer = 1
    with torch.inference_mode():
        pool, graphs = _prefilled(model, tap_layer)
        params = [SamplingParams(temperature=0.7, top_k=3, top_p=0.95, repetition_penalty=1.0)] * 3
        last = [p[-1] for p in PROMPTS]
        pos = [len(p) - 1 for p in PROMPTS]
        out = graphs.decode([0, 1, 2], last, pos, params, [1, 1, 1], [5, 6, 7])
        # The same step again through the plain runner, at the next position of a fresh pool.
        pool2, _ = _prefilled(model, tap_layer)
        runner = DecoderRunner(model.thinker.forward, pool2)
        embeds = model.thinker.embed(torch.tensor(last))
        hidden, tap = runner.decode([0, 1, 2], embeds, torch.tensor(pos).expand(3, -1), tap_layer)
        st = SamplingTensors.build(params, [1, 1, 1], [5, 6, 7], "cpu")
        ref_ids = sample(model.thinker.logits(hidden), st)
    assert torch.equal(out["next_ids"], ref_ids)
    # Batch 3 runs padded to 4: the matmuls see another M, so allow summation-order differences.
    assert rel_err(out["tap"], tap) <= PARITY["hidden_rel"]
    assert pool.context_lens([0, 1, 2]).tolist() == [len(p) + 1 for p in PROMPTS]


def test_decode_routes_rows_beyond_the_candidate_cap_to_the_exact_step(model):
    """A batch with a sampled row of top_k 0 (or above sampling.CANDIDATES) runs the step that sorts the whole
    vocabulary (``full_runner``), never the candidate step: its ids equal the eager sampler's with the host's
    parameters; a batch within the cap replays ``runner``."""
    from omni_rt.sampling import CANDIDATES, SamplingTensors, sample

    vocab = model.cfg.thinker.text.vocab_size
    wide = [SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0),
            SamplingParams(temperature=2.0, top_k=min(CANDIDATES + 1, vocab), top_p=0.95, repetition_penalty=1.0),
            SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)]
    with torch.inference_mode():
        pool, graphs = _prefilled(model, None)
        calls = []
        for name in ("runner", "full_runner"):
            r = getattr(graphs, name)
            r.fn = (lambda fn, name: lambda b: (calls.append(name), fn(b))[1])(r.fn, name)
        last = [p[-1] for p in PROMPTS]
        pos = [len(p) - 1 for p in PROMPTS]
        out = graphs.decode([0, 1, 2], last, pos, wide, [4, 4, 4], [1, 2, 3])["next_ids"].clone()
        assert calls == ["full_runner"]
        pool2, _ = _prefilled(model, None)
        hidden, _ = DecoderRunner(model.thinker.forward, pool2).decode(
            [0, 1, 2], model.thinker.embed(torch.tensor(last)), torch.tensor(pos).expand(3, -1))
        st = SamplingTensors.build(wide, [4, 4, 4], [1, 2, 3], "cpu")
        assert st.within_cap is False
        assert torch.equal(out, sample(model.thinker.logits(hidden), st))
        graphs.decode([0, 1, 2], last, [p + 1 for p in pos], [SamplingParams(temperature=0.7, top_k=40, top_p=0.9,
                                                                             repetition_penalty=1.0)] * 3,
                      [5, 5, 5], [1, 2, 3])
        assert calls == ["full_runner", "runner"]

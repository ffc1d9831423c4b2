"""The CUDA-graph runner (omni_rt.engine.graphs).

CPU: bucket choice, padding of every static input (slot -1, context_len 0, neutral sampling rows), filler
callables, the oversized eager fallback and the error checks, on a toy step and on the thinker decode step
(which on CPU runs eagerly through the same static buffers) against the plain generation loop.
GPU (@gpu): graph replay equals the eager step for each bucket; one graph serves a 16-token and a 3000-token
context; the Runtime's per-request outputs are identical with cuda_graphs=True and False.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from omni_rt.engine.graphs import GraphRunner, PrefillGraphs, ThinkerDecodeGraphs, batch_buckets, token_buckets
from omni_rt.engine.kv_cache import KVCachePool
from omni_rt.engine.model_runner import DecoderRunner, text_positions
from omni_rt.engine.sequence import Sequence
from omni_rt.models.omni import load_model
from omni_rt.request import SamplingParams

from _engine import generate_text
from _tolerances import PARITY, rel_err

PROMPTS = [[449, 11, 5, 100, 200, 300, 42, 450, 5, 449, 12, 5],
           [449, 11, 5, 7, 8, 9, 10, 300, 301, 302, 17, 18, 19, 450, 5, 449, 12, 5],
           [449, 11, 5, 250, 450, 5, 449, 12, 5],
           [449, 11, 5, 61, 62, 63, 64, 65, 450, 5, 449, 12, 5],
           [449, 11, 5, 33, 450, 5, 449, 12, 5]]


# ------------------------------------------------------------------------------------------- toy runner

def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(9) == [1, 2, 4, 8, 9]
    with pytest.raises(ValueError):
        batch_buckets(0)


class _Recorder:
    """A toy step: records the buffers it was called with; y = 10 * x + pos row sum, z = table row sum."""

    def __init__(self):
        self.calls = []

    def __call__(self, b):
        self.calls.append({k: v.clone() for k, v in b.items()})
        return {"y": 10 * b["x"] + b["pos"].sum(0), "z": b["table"].sum(1), "none": None}


def _toy(max_bs=6):
    fn = _Recorder()
    inputs = {"x": torch.zeros(max_bs, dtype=torch.int64), "pos": torch.zeros(3, max_bs, dtype=torch.int64),
              "table": torch.zeros(max_bs, 5, dtype=torch.int32)}
    runner = GraphRunner(fn, inputs, {"x": 7, "pos": 0, "table": -1}, max_bs, batch_dims={"pos": 1},
                         use_graphs=True, name="toy")
    return fn, runner


def test_runner_pads_to_the_bucket_and_slices_outputs():
    fn, runner = _toy()
    assert not runner.use_graphs  # CPU: eager through the static buffers
    runner.capture()  # no-op on CPU
    assert runner.graphs == {}

    def fill_table(buf):
        buf.fill_(-1)
        buf[:3, 0] = torch.tensor([4, 5, 6], dtype=torch.int32)

    out = runner.run(3, {"x": torch.tensor([1, 2, 3]), "pos": torch.tensor([5, 6, 8]).expand(3, 3),
                         "table": fill_table})
    seen = fn.calls[-1]
    assert seen["x"].tolist() == [1, 2, 3, 7]  # bucket 4: one padding row with the pad value
    assert seen["pos"].tolist() == [[5, 6, 8, 0]] * 3
    assert seen["table"][:, 0].tolist() == [4, 5, 6, -1]
    assert out["y"].tolist() == [25, 38, 54] and out["z"].tolist() == [0, 1, 2]
    assert set(out) == {"y", "z"}  # None outputs are left out

    # Smaller batch in a bigger bucket earlier used: stale rows are re-padded.
    runner.run(5, {"x": torch.arange(5), "pos": None, "table": None})
    assert fn.calls[-1]["x"].tolist() == [0, 1, 2, 3, 4, 7]  # bucket 6 = max_batch_size
    out = runner.run(1, {"x": torch.tensor([9])})
    assert fn.calls[-1]["x"].tolist() == [9] and out["y"].tolist() == [90]
    assert fn.calls[-1]["table"].tolist() == [[-1] * 5]  # not given: all padding


def test_warm_up_runs_every_bucket_on_padding():
    fn, runner = _toy()
    runner.warm_up()
    assert [c["x"].tolist() for c in fn.calls] == [[7] * b for b in runner.buckets]   # all padding
    assert runner.graphs == {} and runner.replays == 0


def test_runner_oversized_batch_falls_back_to_exact_buffers():
    fn, runner = _toy(max_bs=4)
    out = runner.run(7, {"x": torch.arange(7), "pos": torch.ones(3, 7, dtype=torch.int64)})
    assert fn.calls[-1]["x"].shape == (7,) and fn.calls[-1]["pos"].shape == (3, 7)
    assert out["y"].tolist() == [10 * i + 3 for i in range(7)]
    assert fn.calls[-1]["table"].eq(-1).all()
    assert runner.inputs["x"].tolist() == [0, 0, 0, 0]  # the static buffers were not touched


def test_host_inputs_are_packed_and_copied_once():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)
            return func(*args, **(kwargs or {}))

    fn = _Recorder()
    inputs = {"x": torch.zeros(6, dtype=torch.int64), "pos": torch.zeros(3, 6, dtype=torch.int64),
              "table": torch.zeros(6, 5, dtype=torch.int32)}
    runner = GraphRunner(fn, inputs, {"x": 7, "pos": 0, "table": -1}, 6, batch_dims={"pos": 1},
                         host_inputs=("x", "pos", "table"))
    storage = runner.packed.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in runner.inputs.values())
    assert runner.inputs["table"].eq(-1).all() and runner.inputs["x"].eq(7).all()   # padding from the start

    def fill_table(host):   # host fillers get the bucket's rows of the staging buffer as numpy
        host[...] = -1
        host[:3, 0] = [4, 5, 6]

    with Copies() as copies:
        out = runner.run(3, {"x": [1, 2, 3], "pos": [5, 6, 8], "table": fill_table})
    assert copies.n == 1   # every host input in one copy
    seen = fn.calls[-1]
    assert seen["x"].tolist() == [1, 2, 3, 7] and seen["pos"].tolist() == [[5, 6, 8, 0]] * 3
    assert seen["table"][:, 0].tolist() == [4, 5, 6, -1]
    assert out["y"].tolist() == [25, 38, 54] and out["z"].tolist() == [0, 1, 2]
    runner.run(5, {"x": np.arange(5)})
    assert fn.calls[-1]["x"].tolist() == [0, 1, 2, 3, 4, 7] and fn.calls[-1]["table"].eq(-1).all()
    out = runner.run(8, {"x": list(range(8)), "pos": [1] * 8, "table": fill_table})   # above the largest bucket
    assert fn.calls[-1]["x"].shape == (8,) and out["y"].tolist() == [10 * i + 3 for i in range(8)]
    assert fn.calls[-1]["table"][:, 0].tolist() == [4, 5, 6] + [-1] * 5
    with pytest.raises(ValueError, match="rows along dim"):
        runner.run(2, {"x": [1, 2, 3]})


def test_runner_rejects_bad_inputs():
    fn, runner = _toy()
    with pytest.raises(ValueError, match="unknown inputs"):
        runner.run(2, {"nope": torch.zeros(2)})
    with pytest.raises(ValueError, match="rows along dim"):
        runner.run(2, {"x": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match=">= 1"):
        runner.run(0, {})
    with pytest.raises(ValueError, match="padding value"):
        GraphRunner(fn, {"x": torch.zeros(2)}, {}, 2)
    with pytest.raises(ValueError, match="rows along dim"):
        GraphRunner(fn, {"x": torch.zeros(3)}, {"x": 0}, 2)


# ------------------------------------------------------------------------------------------- thinker (CPU)

@pytest.fixture(scope="module")
def cpu_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu", with_talker=False)


def _pool(model, device, num_blocks=64, block_size=8, dtype=torch.float32):
    tc = model.cfg.thinker.text
    return KVCachePool(tc.num_hidden_layers, num_blocks, block_size, tc.num_key_value_heads, tc.head_dim, dtype,
                       device)


@pytest.mark.parametrize("graph_tokens,chunk", [(24, 24), (16, 48)], ids=["bucketed-chunks", "above-largest"])
def test_bucketed_prefill_equals_the_unpadded_run(cpu_model, graph_tokens, chunk):
    """Prefill chunks padded to a token bucket (pad tokens on slot -1, past cu_seqlens) give the hidden states,
    taps and greedy ids of the unpadded run, and write no KV slot but the real tokens'; chunks above the
    largest bucket run eagerly at their length through the same fill."""
    assert token_buckets(24) == [16, 24] and token_buckets(512)[:2] == [16, 32] and token_buckets(8) == [8]
    tap = 2
    prompts = [PROMPTS[0][:5], PROMPTS[1][:17], PROMPTS[2][:1], PROMPTS[3] * 3]   # 5 + 17 + 1 + 39 tokens
    h = cpu_model.cfg.thinker.text.hidden_size
    results = []
    with torch.inference_mode():
        for bucketed in (False, True):
            pool = _pool(cpu_model, "cpu")
            graphs = (PrefillGraphs(cpu_model.thinker.forward, pool, 3, 16, h, torch.float32, tap, graph_tokens)
                      if bucketed else None)
            runner = DecoderRunner(cpu_model.thinker.forward, pool, chunk, graphs)
            embeds = [cpu_model.thinker.embed(torch.tensor(p)) for p in prompts]
            positions = [text_positions(0, len(p), "cpu") for p in prompts]
            hidden, taps = runner.prefill([0, 1, 2], embeds[:3], positions[:3], tap)   # one packed chunk
            more, more_taps = runner.prefill([3], embeds[3:], positions[3:], tap)     # chunked: 24 + 15 / 39
            hidden, taps = hidden + more, taps + more_taps
            ids = cpu_model.thinker.logits(torch.stack([x[-1] for x in hidden])).argmax(-1)
            written = int((pool.k_caches[0].reshape(-1, pool.num_kv_heads * pool.head_dim) != 0).any(-1).sum())
            results.append((hidden, taps, ids, written))
            if bucketed:
                assert graphs.runner.buckets == token_buckets(graph_tokens)
    (h0, t0, ids0, w0), (h1, t1, ids1, w1) = results
    assert torch.equal(ids0, ids1)
    assert w0 == w1 == sum(len(p) for p in prompts)   # pads wrote nothing
    for a, b in zip(h0 + t0, h1 + t1):
        assert a.shape == b.shape and rel_err(b, a) <= PARITY["hidden_rel"]


def _params(i):
    return [SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
            SamplingParams(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.0),
            SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5),
            SamplingParams(temperature=1.1, top_k=0, top_p=1.0, repetition_penalty=1.2),
            SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.0)][i % 5]


def _generate_with_graphs(model, graphs, runner, prompts, steps, seeds):
    """Prefill eagerly, then ``steps`` decode steps through ``graphs``; returns each sequence's tokens."""
    device = model.thinker.lm_head.weight.device
    from omni_rt.sampling import SamplingTensors, sample

    seqs = [Sequence(i, _resolved(i, steps, seeds[i]), (), seeds[i], prompt_ids=p) for i, p in enumerate(prompts)]
    embeds = [model.thinker.embed(torch.tensor(s.prompt_ids, device=device)) for s in seqs]
    hidden, _ = runner.prefill([s.seq_id for s in seqs], embeds,
                               [text_positions(0, len(s.prompt_ids), device) for s in seqs])
    logits = model.thinker.logits(torch.stack([h[-1] for h in hidden]))
    seen = torch.zeros(logits.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        seen[i, s.prompt_ids] = True
    st = SamplingTensors.build([s.params for s in seqs], [0] * len(seqs), [s.seed for s in seqs], device)
    for s, tok in zip(seqs, sample(logits, st, seen).tolist()):
        s.push(tok)
    for _ in range(steps - 1):
        penalty = any(s.params.repetition_penalty != 1.0 for s in seqs)
        out = graphs.decode([s.seq_id for s in seqs], [s.output[-1] for s in seqs],
                            [s.next_position() for s in seqs], [s.params for s in seqs],
                            [len(s.output) for s in seqs], [s.seed for s in seqs],
                            [s.prompt_ids + s.output for s in seqs] if penalty else None)
        for s, tok in zip(seqs, out["next_ids"].tolist()):
            s.push(tok)
    return [s.output for s in seqs]


def _resolved(i, steps, seed):
    """Row i's sampling settings, running exactly ``steps`` tokens (no stop id)."""
    return dataclasses.replace(_params(i), max_new_tokens=steps, stop_token_ids=[], seed=seed)


@pytest.mark.parametrize("batch", [3, 5])
def test_thinker_decode_through_static_buffers_equals_plain_generation(cpu_model, batch):
    """Batch 3 pads to the bucket of 4; batch 5 is above max_batch_size 4 (eager fallback)."""
    prompts = PROMPTS[:batch]
    seeds = [101 + i for i in range(batch)]
    steps = 5
    with torch.inference_mode():
        pool = _pool(cpu_model, "cpu")
        graphs = ThinkerDecodeGraphs(cpu_model.thinker, pool, max_batch_size=4, max_model_len=64)
        ours = _generate_with_graphs(cpu_model, graphs, DecoderRunner(cpu_model.thinker.forward, pool), prompts,
                                     steps, seeds)
        ref = generate_text(cpu_model, prompts, [_resolved(i, steps, seeds[i]) for i in range(batch)])
    assert ours == [s.output for s in ref]
    assert graphs.runner.replays == 0


def test_engine_keeps_the_eager_decode_on_cpu(cpu_model):
    from omni_rt.engine.config import EngineConfig
    from omni_rt.engine.engine import Engine

    engine = Engine(cpu_model, EngineConfig(max_batch_size=2, kv_cache_tokens=256, cuda_graphs=True),
                    torch.device("cpu"), torch.float32)
    assert engine.stages.decode_graphs is None and engine.stages.graph_report() == {}


# ------------------------------------------------------------------------------------------- GPU

@pytest.fixture(scope="module")
def gpu_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cuda", with_talker=False)


@pytest.mark.gpu
def test_graph_replay_equals_eager_for_each_bucket(gpu_model):
    tap_layer = 2
    with torch.inference_mode():
        pool = _pool(gpu_model, "cuda", num_blocks=128)
        runner = DecoderRunner(gpu_model.thinker.forward, pool)
        embeds = [gpu_model.thinker.embed(torch.tensor(p, device="cuda")) for p in PROMPTS]
        runner.prefill(list(range(5)), embeds, [text_positions(0, len(p), "cuda") for p in PROMPTS])
        graphs = ThinkerDecodeGraphs(gpu_model.thinker, pool, max_batch_size=5, max_model_len=128,
                                     tap_layer=tap_layer)
        graphs.capture()
        assert sorted(graphs.runner.graphs) == [1, 2, 4, 5]
        for n in (1, 2, 3, 4, 5):
            bs = graphs.runner.bucket_for(n)
            ids = list(range(n))
            lens = pool.context_lens(ids).tolist()
            values = graphs.inputs_for(ids, [PROMPTS[i][-1] for i in ids], lens, [_params(i) for i in ids],
                                       [n] * n, [7 * i for i in ids], [PROMPTS[i] for i in ids])
            view = graphs.runner.view(bs)
            graphs.runner.fill(view, n, values)
            eager = {k: v.clone() for k, v in graphs.step(view).items() if v is not None}
            for out in graphs.runner.outputs.values():
                out.zero_()
            graphs.runner.graphs[bs].replay()
            torch.cuda.synchronize()
            replay = graphs.runner.outputs
            assert torch.equal(replay["next_ids"][:n], eager["next_ids"][:n]), n
            assert rel_err(replay["tap"][:n], eager["tap"][:n]) <= 1e-6, n


@pytest.mark.gpu
def test_graph_captured_once_serves_short_and_3000_token_contexts(gpu_model):
    """The graph is captured before any sequence exists; replays at 16 and 3000 tokens of context must
    equal the eager runner (the paged kernel reads the lengths from device tensors)."""
    tap_layer = gpu_model.cfg.thinker.text.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, 400, (2999,), generator=g).tolist()
    short_prompt = PROMPTS[0] + [5, 6, 7, 8]  # 16 tokens with the decode token
    with torch.inference_mode():
        results = {}
        for use_graphs in (True, False):
            pool = _pool(gpu_model, "cuda", num_blocks=512, block_size=16)
            runner = DecoderRunner(gpu_model.thinker.forward, pool)
            graphs = ThinkerDecodeGraphs(gpu_model.thinker, pool, max_batch_size=2, max_model_len=4096,
                                         use_graphs=use_graphs, tap_layer=tap_layer)
            graphs.capture()
            outs = []
            for sid, prompt in ((0, short_prompt[:-1]), (1, long_prompt)):
                x = gpu_model.thinker.embed(torch.tensor(prompt, device="cuda"))
                runner.prefill([sid], [x], [text_positions(0, len(prompt), "cuda")])
                last = short_prompt[-1] if sid == 0 else 17
                out = graphs.decode([sid], [last], [len(prompt)], [_params(1)], [3], [11])
                outs.append({k: v.clone() for k, v in out.items()})
                assert pool.context_lens([sid]).item() == len(prompt) + 1
            # Both together: one row at 16 tokens, one at 3000, in the bucket of 2.
            out = graphs.decode([0, 1], [9, 10], [16, 3000], [_params(0), _params(1)], [4, 4], [11, 12])
            outs.append({k: v.clone() for k, v in out.items()})
            results[use_graphs] = (outs, graphs.runner.replays)
    (graph_outs, replays), (eager_outs, eager_replays) = results[True], results[False]
    assert replays == 3 and eager_replays == 0
    for a, b in zip(graph_outs, eager_outs):
        assert torch.equal(a["next_ids"], b["next_ids"])
        assert rel_err(a["tap"], b["tap"]) <= PARITY["hidden_rel"]


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    from omni_rt.testing import make_checkpoint, tiny_config

    cfg = tiny_config()
    cfg["enable_audio_output"] = False
    return make_checkpoint(tmp_path_factory.mktemp("tiny_text_graphs"), cfg, seed=0)


@pytest.mark.gpu
def test_runtime_outputs_identical_with_and_without_cuda_graphs(text_ckpt):
    import omni_rt

    prompts = [omni_rt.Prompt(token_ids=p) for p in PROMPTS]
    params = [omni_rt.SamplingParams(temperature=0.0, max_new_tokens=12),
              omni_rt.SamplingParams(temperature=0.9, top_k=20, top_p=0.8, seed=5, max_new_tokens=12),
              omni_rt.SamplingParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=9),
              omni_rt.SamplingParams(temperature=1.1, repetition_penalty=1.2, seed=9, max_new_tokens=12),
              omni_rt.SamplingParams(temperature=0.7, top_k=5, seed=3, max_new_tokens=7)]
    outputs = {}
    for cuda_graphs in (True, False):
        with omni_rt.Runtime(text_ckpt, device="cuda", dtype=torch.float32, cuda_graphs=cuda_graphs,
                             max_batch_size=4) as rt:
            assert (rt.engine.stages.decode_graphs is not None) == cuda_graphs
            results = [None] * len(prompts)

            def run(i):
                results[i] = rt.generate(prompts[i], thinker=params[i], request_id=f"r{i}").token_ids

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            solo = rt.generate(prompts[1], thinker=params[1]).token_ids
            if cuda_graphs:
                assert rt.engine.stages.decode_graphs.runner.replays > 0
            outputs[cuda_graphs] = (results, solo)
    assert outputs[True] == outputs[False]


# ------------------------------------------------------------------------------------------- speech steps

@pytest.fixture(scope="module")
def speech_models(tiny_checkpoint, tiny_config):
    """(code predictor, Code2Wav) per device, fp32."""
    from omni_rt.loader import assign_parameters, iter_weights
    from omni_rt.models.code2wav import Code2Wav

    cache = {}

    def get(device):
        if device not in cache:
            model = load_model(tiny_checkpoint, torch.float32, device)
            with torch.device("meta"):
                c2w = Code2Wav(tiny_config.code2wav)
            assign_parameters(c2w, iter_weights(tiny_checkpoint, tiny_config, torch.float32, device),
                              prefix="code2wav.")
            cache[device] = (model.talker.code_predictor, c2w)
        return cache[device]

    return get


def _frame_inputs(cp, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = cp.cfg.hidden_size
    return {"past_hidden": torch.randn(n, h, generator=g).to(device),
            "code0_embed": torch.randn(n, h, generator=g).to(device),
            "temperature": torch.tensor([0.0, 0.9, 1.2, 0.0, 0.7][:n], device=device),
            "top_p": torch.tensor([1.0, 0.8, 1.0, 1.0, 0.9][:n], device=device),
            "top_k": torch.tensor([0, 10, 0, 0, 3][:n], device=device),
            "seeds": torch.arange(n, device=device) * 7 + 1,
            "frame_index": torch.arange(n, device=device) + 2}


def _frame_direct(cp, v):
    from omni_rt.models.code_predictor import FrameSampling

    s = FrameSampling(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"], seeds=v["seeds"],
                      frame_index=v["frame_index"])
    return cp.frame(v["past_hidden"], v["code0_embed"], None, s)


def _check_frames(runner, cp, device, exact):
    for n in (3, 2, 5):  # bucket 4, bucket 2, above the largest bucket (eager fallback)
        v = _frame_inputs(cp, n, device, seed=n)
        out = runner.run(n, v)
        codes, nxt = _frame_direct(cp, v)
        assert torch.equal(out["codes"], codes), n
        if exact:
            assert torch.equal(out["next_embed"], nxt), n
        else:
            assert rel_err(out["next_embed"], nxt) <= PARITY["hidden_rel"], n


def test_code_predictor_runner_equals_frame(speech_models):
    from omni_rt.engine.graphs import code_predictor_graphs

    cp, _ = speech_models("cpu")
    with torch.inference_mode():
        runner = code_predictor_graphs(cp, max_batch_size=4)
        _check_frames(runner, cp, "cpu", exact=False)


def _stream_codes(c2w, n, frames, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c2w.cfg.codebook_size, (n, c2w.cfg.num_quantizers, frames), generator=g)


def _check_code2wav(runner, c2w, device, n, frames=3):
    from omni_rt.engine.graphs import state_from, state_names

    codes = _stream_codes(c2w, n, frames, seed=n).to(device)
    state = c2w.init_state(n)
    ref_state = c2w.init_state(n)
    for f in range(frames):
        step = codes[..., f:f + 1]
        values = {"codes": step} | dict(zip(state_names(state), state.tensors()))
        out = runner.run(n, values)
        state = state_from(out, state.layout, prefix="new_").clone()  # outputs are views of static buffers
        ref_audio, ref_state = c2w.step_padded(step, ref_state)
        assert rel_err(out["audio"], ref_audio) <= 1e-6, (n, f)
        assert torch.equal(state.pos, ref_state.pos)


def test_code2wav_runner_equals_step(speech_models):
    from omni_rt.engine.graphs import code2wav_graphs

    _, c2w = speech_models("cpu")
    with torch.inference_mode():
        runner = code2wav_graphs(c2w, max_batch_size=2)
        for n in (1, 2, 3):  # bucket 1, bucket 2, above the largest bucket
            _check_code2wav(runner, c2w, "cpu", n)


@pytest.mark.gpu
def test_code_predictor_graph_replay_equals_eager(speech_models):
    from omni_rt.engine.graphs import code_predictor_graphs

    cp, _ = speech_models("cuda")
    with torch.inference_mode():
        runner = code_predictor_graphs(cp, max_batch_size=4)
        runner.capture()
        assert sorted(runner.graphs) == [1, 2, 4]
        _check_frames(runner, cp, "cuda", exact=False)
        assert runner.replays == 2


@pytest.mark.gpu
def test_code2wav_graph_replay_equals_eager(speech_models):
    from omni_rt.engine.graphs import code2wav_graphs

    _, c2w = speech_models("cuda")
    with torch.inference_mode():
        runner = code2wav_graphs(c2w, max_batch_size=2)
        runner.capture()
        for n in (1, 2):
            _check_code2wav(runner, c2w, "cuda", n)
        assert runner.replays == 6


@pytest.mark.gpu
def test_speech_runtime_replays_every_graph_and_equals_eager(tiny_checkpoint):
    """Graphs are loud: with cuda_graphs=True every graphed stage (thinker decode, code-predictor frame,
    Code2Wav step, the whole steady-state speech frame) reports that it replays, replays happen, and the
    outputs equal the eager runtime's (ids and codes exactly)."""
    import numpy as np

    import omni_rt

    p = omni_rt.Prompt(token_ids=[449, 11, 5, 100, 200, 300, 42, 450, 5, 449, 12, 5])
    t = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10)
    k = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=20)
    outs = {}
    for graphs in (True, False):
        with omni_rt.Runtime(tiny_checkpoint, device="cuda", dtype=torch.float32, cuda_graphs=graphs,
                             max_batch_size=4) as rt:
            report = rt.engine.stages.graph_report()
            if graphs:
                assert report and all(report.values()), report
                assert rt.warmup_s > 0
            outs[graphs] = rt.generate(p, thinker=t, talker=k)
            if graphs:
                st = rt.engine.stages
                assert st.speech_graph.replays > 0 and st.decode_graphs.runner.replays > 0
                assert st.thinker_runner.graphs.runner.replays > 0 and st.talker_runner.graphs.runner.replays > 0
    assert outs[True].token_ids == outs[False].token_ids
    assert np.array_equal(outs[True].codes, outs[False].codes)

"""Per-frame speech cost: one talker decode step and one code-predictor frame loop, ours vs transformers.

Same random weights for both. On CPU: the ``small`` config in fp32, batch 1. On CUDA: the released talker
(20 MoE layers, hidden 1024) and code predictor (5 layers, 16 code groups) in bf16, batch 1 and 8.

* talker step: one decode token per sequence after a prompt of CONTEXT tokens — ours through
  ``DecoderRunner.decode`` over the paged KV pool, transformers' ``Qwen3OmniMoeTalkerForConditionalGeneration``
  forward with a DynamicCache of the same length (both caches grow by one token per round, same rounds).
* frame loop: the G-1 residual codes of a frame — ours ``CodePredictor.frame`` (static shapes, no host sync),
  transformers' ``code_predictor.generate(inputs_embeds=[past_hidden, code0_embed], max_new_tokens=G-1)``,
  which is what its talker runs per frame.

extra_info: ``ref_s`` / ``ours_s`` medians timed the same way and ``speedup`` = ref_s / ours_s. CPU timings use
one intra-op thread for both sides (stable on a shared host).

    pytest benchmarks/bench_talker.py --benchmark-only
    pytest benchmarks/bench_talker.py --benchmark-disable     # smoke run
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from omni_rt.config import OmniConfig
from omni_rt.engine.kv_cache import KVCachePool
from omni_rt.engine.model_runner import DecoderRunner, text_positions
from omni_rt.loader import assign_parameters
from omni_rt.models.talker import Talker
from omni_rt.testing import full_config, random_state_dict, resolve_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CONFIG = "full" if CUDA else "small"
BATCHES = [1, 8] if CUDA else [1]
CONTEXT = 1024 if CUDA else 128
ROUNDS = 30 if CUDA else 10
PREFIX = "talker."


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _config_dict() -> dict:
    if CONFIG != "full":
        cfg = resolve_config(CONFIG)
        # layout.py sizes the projections' fc1 by the thinker width, transformers by text_config.intermediate_size
        # (equal in the released config): make them agree here
        cfg["talker_config"]["text_config"]["intermediate_size"] = cfg["talker_config"]["thinker_hidden_size"]
        return cfg
    cfg = full_config(layers=1)   # 1-layer thinker/code2wav: only the talker weights are used
    released = full_config()["talker_config"]
    cfg["talker_config"]["text_config"]["num_hidden_layers"] = released["text_config"]["num_hidden_layers"]
    cfg["talker_config"]["code_predictor_config"]["num_hidden_layers"] = \
        released["code_predictor_config"]["num_hidden_layers"]
    return cfg


_MODELS: dict = {}


def _models():
    """(ours Talker, transformers' talker or None, OmniConfig) with the same random weights, cached."""
    if _MODELS:
        return _MODELS["m"]
    cfg_dict = _config_dict()
    cfg = OmniConfig.from_dict(cfg_dict)
    weights = {n: t for n, t in random_state_dict(cfg_dict, seed=0, dtype=DTYPE, device=DEVICE)
               if n.startswith(PREFIX)}
    with torch.device("meta"):
        ours = Talker(cfg.talker, cfg.thinker.text.hidden_size)
    assign_parameters(ours, weights.items(), prefix=PREFIX)
    ref = None
    try:
        from transformers import Qwen3OmniMoeConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import \
            Qwen3OmniMoeTalkerForConditionalGeneration

        hf_cfg = Qwen3OmniMoeConfig(**cfg_dict).talker_config
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(DEVICE):
            ref = Qwen3OmniMoeTalkerForConditionalGeneration(hf_cfg)
        ref = ref.to(dtype=DTYPE).eval()
        ref.load_state_dict({n[len(PREFIX):]: t for n, t in weights.items()}, strict=True)
    except ImportError:
        pass
    _MODELS["m"] = (ours.eval(), ref, cfg)
    return _MODELS["m"]


def _median_time(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _record(benchmark, run_ours, run_ref, rounds: int, **info) -> None:
    threads = torch.get_num_threads()
    if not CUDA:
        # one intra-op thread for both sides: on a shared 2-core host, OpenMP spin-waits in tiny ops (index_add_,
        # einsum) otherwise swamp per-frame timings by 10-100x
        torch.set_num_threads(1)
    try:
        _record_timed(benchmark, run_ours, run_ref, rounds, threads=torch.get_num_threads(), **info)
    finally:
        torch.set_num_threads(threads)


def _record_timed(benchmark, run_ours, run_ref, rounds: int, **info) -> None:
    benchmark.pedantic(run_ours, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(info)
    if benchmark.disabled:
        if run_ref is not None:
            run_ref()
        return
    ours_s = _median_time(run_ours, rounds)
    benchmark.extra_info["ours_s"] = ours_s
    if run_ref is not None:
        ref_s = _median_time(run_ref, rounds)
        benchmark.extra_info.update(ref_s=ref_s, speedup=ref_s / ours_s)


@pytest.mark.parametrize("batch", BATCHES)
def test_talker_step(benchmark, batch):
    ours, ref, cfg = _models()
    tc = cfg.talker.text
    g = torch.Generator(device=DEVICE).manual_seed(0)
    prompt = torch.randn(batch, CONTEXT, tc.hidden_size, generator=g, device=DEVICE, dtype=DTYPE)
    step = torch.randn(batch, tc.hidden_size, generator=g, device=DEVICE, dtype=DTYPE)
    max_tokens = CONTEXT + 4 * ROUNDS + 8
    pool = KVCachePool(tc.num_hidden_layers, batch * (max_tokens // 16 + 2), 16, tc.num_key_value_heads,
                       tc.head_dim, DTYPE, DEVICE)
    runner = DecoderRunner(ours.forward, pool, max_prefill_tokens=4096)
    ids = list(range(batch))
    with torch.inference_mode():
        runner.prefill(ids, list(prompt), [text_positions(0, CONTEXT, DEVICE)] * batch)
    pos = [CONTEXT]

    def run_ours():
        with torch.inference_mode():
            p = torch.full((3, batch), pos[0], device=DEVICE, dtype=torch.long)
            h, _ = runner.decode(ids, step, p)
            out = ours.logits(h)
        pos[0] += 1
        return out

    run_ref = None
    if ref is not None:
        from transformers import DynamicCache

        cache = DynamicCache(config=ref.config.text_config)
        with torch.inference_mode():
            ref(inputs_embeds=prompt, past_key_values=cache, use_cache=True)

        def run_ref():
            with torch.inference_mode():
                return ref(inputs_embeds=step[:, None], past_key_values=cache, use_cache=True,
                           generation_step=0).logits

    _record(benchmark, run_ours, run_ref, ROUNDS, batch=batch, context=CONTEXT, config=CONFIG,
            dtype=str(DTYPE))


@pytest.mark.parametrize("batch", BATCHES)
def test_code_predictor_frame(benchmark, batch):
    ours, ref, cfg = _models()
    h = cfg.talker.text.hidden_size
    g = torch.Generator(device=DEVICE).manual_seed(1)
    past = torch.randn(batch, h, generator=g, device=DEVICE, dtype=DTYPE)
    code0 = torch.randint(0, cfg.talker.code_predictor.vocab_size, (batch,), generator=g, device=DEVICE)
    cp = ours.code_predictor
    ws = cp.workspace(batch)
    with torch.inference_mode():
        e = ours.embed_codec(code0)

    def run_ours():
        with torch.inference_mode():
            return cp.frame(past, e, ws)

    run_ref = None
    if ref is not None:
        x = torch.stack((past, e), dim=1)

        def run_ref():
            with torch.inference_mode():
                return ref.code_predictor.generate(inputs_embeds=x, max_new_tokens=cfg.talker.num_code_groups - 1,
                                                   do_sample=False)

        # same work: the reference's greedy codes equal ours
        with torch.inference_mode():
            assert torch.equal(run_ref(), run_ours()[0]) or DTYPE != torch.float32

    _record(benchmark, run_ours, run_ref, ROUNDS, batch=batch, code_groups=cfg.talker.num_code_groups,
            config=CONFIG, dtype=str(DTYPE))

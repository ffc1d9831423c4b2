"""End to end: a spoken question in, speech out.

CPU: the tiny synthetic checkpoint, omni_rt's Runtime.generate vs transformers' generate on the same prompt and
the same greedy settings, in the same run (ratio in extra_info; target ≥ 3× faster), plus first-packet latency
and RTF of the streaming path. GPU: the full released shapes with synthetic weights built in device memory,
first packet / TTFT / tok/s / frames/s / RTF / underruns at concurrency 1, 4, 6 (p50/p90 in extra_info).
"""
from __future__ import annotations

import time

import pytest
import torch

import omni_rt
from omni_rt.bench import question_prompt, run_benchmark, spoken_question

THINKER_TOKENS = 12
TALKER_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return omni_rt.testing.make_checkpoint(tmp_path_factory.mktemp("e2e_tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def rt(tiny_ckpt):
    runtime = omni_rt.Runtime(tiny_ckpt, device="cpu", max_batch_size=6)
    yield runtime
    runtime.close()


def _params():
    return (omni_rt.SamplingParams(temperature=0.0, max_new_tokens=THINKER_TOKENS),
            omni_rt.SamplingParams(temperature=0.0, max_new_tokens=TALKER_TOKENS))


@pytest.mark.parametrize("config", ["tiny", "small"])
@pytest.mark.benchmark(group="e2e-cpu")
def test_generate_vs_transformers(benchmark, tmp_path, config):
    transformers = pytest.importorskip("transformers")
    ckpt = omni_rt.testing.make_checkpoint(tmp_path / config, config, seed=0)
    rt = omni_rt.Runtime(ckpt, device="cpu")
    wav = spoken_question(5.0)
    prompt = question_prompt(rt.cfg, wav)
    thinker, talker = _params()
    hf = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    feats = fe(wav, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
               return_tensors="pt")

    def run_hf():
        with torch.inference_mode():
            return hf.generate(torch.tensor([prompt.token_ids]), speaker="ethan",
                               input_features=feats["input_features"],
                               feature_attention_mask=feats["attention_mask"],
                               thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
                               talker_max_new_tokens=TALKER_TOKENS, talker_do_sample=False)

    run_hf()  # warm-up
    t0 = time.perf_counter()
    run_hf()
    hf_s = time.perf_counter() - t0

    times = []

    def ours():
        t = time.perf_counter()
        result = rt.generate(prompt, speaker="ethan", thinker=thinker, talker=talker)
        times.append(time.perf_counter() - t)
        return result

    try:
        out = benchmark.pedantic(ours, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        rt.close()
    ours_s = sorted(times)[len(times) // 2]  # our own clock: pytest-benchmark keeps no stats when disabled
    benchmark.extra_info.update({
        "transformers_s": hf_s, "omni_rt_s": ours_s, "speedup_vs_transformers": hf_s / ours_s,
        "first_packet_ms": out.metrics.get("first_packet_ms"), "rtf": out.metrics.get("rtf"),
        "audio_s": out.metrics.get("audio_s"), "device": "cpu", "config": config})


@pytest.mark.benchmark(group="e2e-cpu")
def test_stream_first_packet(benchmark, rt):
    prompt = question_prompt(rt.cfg, spoken_question(5.0))
    thinker, talker = _params()

    def first_packet():
        t0 = time.perf_counter()
        for chunk in rt.stream(prompt, thinker=thinker, talker=talker):
            if chunk.audio.size:
                return (time.perf_counter() - t0) * 1000
        return None

    first_packet()
    ms = benchmark.pedantic(first_packet, rounds=3, iterations=1)
    benchmark.extra_info.update({"first_packet_ms": ms, "device": "cpu", "config": "tiny"})


@pytest.mark.gpu
@pytest.mark.benchmark(group="e2e-gpu")
def test_full_size_concurrency(benchmark):
    from omni_rt.testing import build_synthetic_model

    model = build_synthetic_model("full", torch.bfloat16, "cuda")
    with omni_rt.Runtime(model, device="cuda", dtype=torch.bfloat16, max_batch_size=6) as full:
        report = benchmark.pedantic(lambda: run_benchmark(full, [1, 4, 6], seconds=5.0, max_new_tokens=64,
                                                          talker_max_new_tokens=128), rounds=1, iterations=1)
    benchmark.extra_info.update({"report": report, "device": torch.cuda.get_device_name(0),
                                 "note": "synthetic weights route near-uniformly (worst case for expert reuse)"})
    del model
    torch.cuda.empty_cache()  # ~70 GB: give it back before the next suite builds its own full-size model

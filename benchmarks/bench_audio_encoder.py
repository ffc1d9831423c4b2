"""AuT audio encoder latency: omni_rt.models.audio_encoder vs transformers' Qwen3OmniMoeAudioEncoder.

Both get the same random log-mel input (100 frames per second) and the same random weights. On CPU: the
tiny and small configs in fp32. On CUDA: the released audio config (32 layers, d_model 1280) in bf16 with
``random_state_dict`` weights, transformers with its default (sdpa, one call per window) attention.
extra_info: tokens, ``ref_s`` (transformers' median), ``ours_s`` (our median, timed the same way),
``speedup`` (ref_s / ours_s) and, for 40 minutes, the peak memory each adds during a call (CUDA: allocator
peak; CPU: peak RSS).

    pytest benchmarks/bench_audio_encoder.py --benchmark-only      # timings + extra_info ratios
    pytest benchmarks/bench_audio_encoder.py --benchmark-disable    # smoke run: one call each, short audio
"""
from __future__ import annotations

import pytest
import torch

from _model_bench import CONFIGS, CUDA, DEVICE, DTYPE, paired_towers, record_same_run, sync, tower_config
from omni_rt.config import OmniConfig
from omni_rt.models.audio_encoder import AudioEncoder

PREFIX = "thinker.audio_tower."
SECONDS = [5, 30, 300, 2400]
SMOKE_MAX_SECONDS = 30  # with --benchmark-disable on CPU, longer audio is skipped to keep the smoke run quick

_MODELS: dict[str, tuple] = {}


def _models(name: str):
    """(ours, transformers' audio tower or None) on DEVICE in DTYPE with the same random weights, cached."""
    if name not in _MODELS:
        cfg_dict = tower_config(name, "audio_config")
        with torch.device("meta"):
            ours = AudioEncoder(OmniConfig.from_dict(cfg_dict).thinker.audio)

        def build_ref():
            from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import \
                Qwen3OmniMoeAudioEncoderConfig
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

            hf_cfg = Qwen3OmniMoeAudioEncoderConfig(**cfg_dict["thinker_config"]["audio_config"])
            hf_cfg._attn_implementation = "sdpa"
            return Qwen3OmniMoeAudioEncoder(hf_cfg)

        _MODELS[name] = paired_towers(cfg_dict, PREFIX, ours, build_ref)
    return _MODELS[name]


def _features(seconds: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seconds)
    frames = seconds * 100
    x = torch.randn(128, frames, generator=g) * 0.35 + torch.linspace(0.6, -0.6, 128)[:, None]
    return torch.maximum(x, x.max() - 2.0).to(device=DEVICE, dtype=DTYPE)


def _peak_growth_bytes(fn) -> int:
    """Peak memory one call of ``fn`` adds: CUDA allocator peak, or peak RSS (Linux; 0 if it cannot reset)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) so the reading below is this call's
        base = _status_bytes("VmRSS:")
    except (OSError, StopIteration):
        return 0
    fn()
    return _status_bytes("VmHWM:") - base


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_audio_encoder_latency(benchmark, config, seconds):
    smoke = benchmark.disabled
    if smoke and not CUDA and seconds > SMOKE_MAX_SECONDS:
        pytest.skip(f"{seconds} s on CPU runs only when benchmarking (smoke runs stop at {SMOKE_MAX_SECONDS} s)")
    ours, ref = _models(config)
    x = _features(seconds)
    lens = torch.tensor([x.shape[1]], device=DEVICE)

    def run_ours():
        with torch.inference_mode():
            out = ours(x, lens)
        sync()
        return out

    def run_ref():
        with torch.inference_mode():
            out = ref(x, feature_lens=lens).last_hidden_state
        sync()
        return out

    out = run_ours()  # warm-up: Triton compile / allocator / oneDNN primitive caches
    reps = 1 if smoke or seconds >= 300 else 3
    info = benchmark.extra_info
    info.update({"config": config, "device": DEVICE, "dtype": str(DTYPE), "seconds": seconds,
                 "tokens": out.shape[0]})
    record_same_run(info, out, run_ours, run_ref if ref is not None else None, reps)
    if seconds == max(SECONDS):
        info["peak_mem_ours_MB"] = _peak_growth_bytes(run_ours) / 2**20
        if ref is not None:
            info["peak_mem_ref_MB"] = _peak_growth_bytes(run_ref) / 2**20
    benchmark.pedantic(run_ours, rounds=1 if seconds >= 300 else 3, warmup_rounds=0, iterations=1)

"""log-mel feature extraction: omni_rt.audio.log_mel vs transformers' WhisperFeatureExtractor(feature_size=128).

Both get the same 16 kHz float32 numpy input and the processor's arguments (no truncation). Ours runs on CUDA
when available (fp64 STFT there; timed with the host→device copy and a synchronize, output left on the device
for the encoder), else on CPU (fp32). The reference runs its torch path on CPU, and on CUDA too when available
(its ``device=`` argument; it copies the result back to the host, as its API returns numpy).

    pytest benchmarks/bench_audio.py --benchmark-only                 # timings + extra_info ratios
    pytest benchmarks/bench_audio.py --benchmark-disable               # smoke run (one call each)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _model_bench import median_s
from omni_rt import audio

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SECONDS = [30, 600]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _signal(seconds: int) -> np.ndarray:
    # Timing does not depend on content; an amplitude-modulated noise keeps the clamp floor non-trivial.
    rs = np.random.RandomState(0)
    n = seconds * audio.SAMPLE_RATE
    env = 0.05 + 0.3 * np.abs(np.sin(2 * np.pi * 0.5 * np.arange(n) / audio.SAMPLE_RATE))
    return (rs.randn(n) * env).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_fe():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=128)


def _reference(fe, wav: np.ndarray, device: str = "cpu"):
    return fe(wav, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
              device=device)["input_features"]


def _median_s(fn, reps: int) -> float:
    return median_s(fn, reps, warmup=True)   # warm-up: allocator, cuFFT plans, filter cache


@pytest.mark.parametrize("seconds", SECONDS)
def test_log_mel(benchmark, whisper_fe, seconds):
    wav = _signal(seconds)

    def ours():
        out = audio.log_mel(wav, device=DEVICE)
        _sync()
        return out

    benchmark.group = f"log_mel {seconds}s"
    out = benchmark(ours)
    assert out.shape == (audio.N_MELS, seconds * 100)

    # Baseline in the same run, timed the same way as ours so the ratio compares like with like.
    reps = 1 if benchmark.disabled else 5
    ours_s = _median_s(ours, reps)
    ref_cpu_s = _median_s(lambda: _reference(whisper_fe, wav), reps)
    info = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "audio_seconds": seconds,
        "ours_median_s": ours_s,
        "ref_cpu_median_s": ref_cpu_s,
        "speedup_vs_ref_cpu": ref_cpu_s / ours_s,
        "ours_x_realtime": seconds / ours_s,
    }
    if DEVICE == "cuda":
        ref_cuda_s = _median_s(lambda: _reference(whisper_fe, wav, "cuda"), reps)
        info.update(ref_cuda_median_s=ref_cuda_s, speedup_vs_ref_cuda=ref_cuda_s / ours_s)
    benchmark.extra_info.update(info)
    print(f"\nlog_mel {seconds}s on {info['device']}: ours {ours_s * 1e3:.1f} ms, WhisperFeatureExtractor(cpu) "
          f"{ref_cpu_s * 1e3:.1f} ms, ratio {ref_cpu_s / ours_s:.2f}x")


@pytest.mark.parametrize("seconds", SECONDS)
def test_log_mel_reference(benchmark, whisper_fe, seconds):
    # The reference as its own row of the same group (pytest-benchmark's table then shows both).
    wav = _signal(seconds)
    benchmark.group = f"log_mel {seconds}s"
    out = benchmark(_reference, whisper_fe, wav)
    assert out.shape == (1, audio.N_MELS, seconds * 100)

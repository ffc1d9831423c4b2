"""Code2Wav per-frame cost: the exact streaming step vs re-decoding with 25 frames of left context.

``stream``:   ``Code2Wav.step_padded`` on one new frame with the carried state (sliding-window KV, conv
              states, transposed-conv tails) — no past frame is recomputed.
``redecode``: what transformers' ``chunked_decode(codes, chunk, 25)`` does when used for streaming: decode the
              new frame together with its 25 frames of left context from scratch and keep the last T samples
              (same model and kernels, so the ratio isolates the recomputation).
The ``stream`` test times the step and, in the same run, the re-decode baseline (median of a few calls):
extra_info holds both medians, their ratio, and the real-time factor (per-frame time / 80 ms of audio).

CPU: the tiny and small test configs with random weights, fp32, one thread per op (absolute CPU times are
noise; the ratio is the number). CUDA: the released shapes (hidden 1024, 8 layers, decoder_dim 1536), bf16,
synchronize inside the timed call.

    pytest benchmarks/bench_code2wav.py --benchmark-only
    pytest benchmarks/bench_code2wav.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import omni_rt
from omni_rt.config import OmniConfig
from omni_rt.models.code2wav import Code2Wav
from omni_rt.testing import small_config, tiny_config

CUDA = torch.cuda.is_available()
CONTEXT = 25
FRAME_SECONDS = 0.08


def _config(name: str):
    if name == "released":
        path = os.path.join(os.path.dirname(omni_rt.__file__), "assets", "qwen3-omni-30b-a3b-instruct.json")
        return OmniConfig.from_file(path).code2wav
    return OmniConfig.from_dict({"tiny": tiny_config, "small": small_config}[name]()).code2wav


CONFIGS = ["released"] if CUDA else ["tiny", "small"]


def _model(cfg, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        m = Code2Wav(cfg)
    with torch.no_grad():
        # default init leaves LayerScale/gamma tiny and snake params 0; timing does not care, but keep the
        # activations in a realistic range so no path short-circuits on zeros
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.to(dtype)
    m.materialize_buffers(device)  # after the cast: the rotary frequencies stay fp32
    return m.eval()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("config", CONFIGS)
def test_stream_step_vs_redecode(benchmark, config):
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    try:
        cfg = _config(config)
        m = _model(cfg, device, dtype)
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, CONTEXT + 1), generator=g).to(device)
        # a stream already CONTEXT frames in, so the step attends over a full window like a steady state
        _, state = m.step_padded(codes[..., :CONTEXT], m.init_state(1))
        frame = codes[..., CONTEXT:]
        holder = {"state": state}

        def stream():
            audio, holder["state"] = m.step_padded(frame, holder["state"])
            _sync()
            return audio

        def redecode():
            audio = m.decode(codes)[:, -m.samples_per_frame:]
            _sync()
            return audio

        # both emit the same final samples for the new frame (exactness is tested in tests/test_code2wav.py)
        assert stream().shape[-1] == redecode().shape[-1] == m.samples_per_frame
        holder["state"] = state
        rounds = 1 if benchmark.disabled else (20 if CUDA or config == "tiny" else 5)
        base = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            redecode()
            base.append(time.perf_counter() - t0)
        benchmark.pedantic(stream, rounds=rounds, warmup_rounds=0 if benchmark.disabled else 2)
        if not benchmark.disabled:
            step_s = benchmark.stats.stats.median
            base_s = statistics.median(base)
            benchmark.extra_info.update(
                config=config, device=device, dtype=str(dtype), samples_per_frame=m.samples_per_frame,
                stream_ms=step_s * 1e3, redecode_ms=base_s * 1e3, redecode_over_stream=base_s / step_s,
                rtf_stream=step_s / FRAME_SECONDS, rtf_redecode=base_s / FRAME_SECONDS)
    finally:
        torch.set_num_threads(threads)

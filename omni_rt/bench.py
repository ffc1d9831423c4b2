"""End-to-end latency benchmark shared by ``omni-rt bench`` and benchmarks/bench_e2e.py.

For each concurrency level c, c requests (a spoken question, speech out) are submitted at once; per request it
records first-packet latency (call → first non-empty audio chunk), thinker TTFT, thinker tokens/s, talker
frames/s, RTF (wall time ÷ audio seconds) and playback underruns: a listener starts playing at the first
packet, and an underrun is a moment when the next chunk arrives after the audio received so far has run out.
Reports p50/p90 per metric.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from . import audio as audio_mod
from .request import Prompt, SamplingParams

ASSET = os.path.join(os.path.dirname(__file__), "assets", "question.wav")


def spoken_question(seconds: float = 5.0) -> np.ndarray:
    """The shipped spoken question (16 kHz), padded with silence (or cut) to ``seconds``."""
    wav = audio_mod.load(ASSET)
    n = int(seconds * audio_mod.SAMPLE_RATE)
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, wav.size)] = wav[:n]
    return out


def question_prompt(cfg, wav: np.ndarray, newline_id: int = 198) -> Prompt:
    """Token ids exactly as the processor lays out a user turn with one audio, then the assistant turn."""
    n_tok = audio_mod.num_audio_tokens(audio_mod.num_frames(wav.size))
    th = cfg.thinker
    ids = ([cfg.im_start_token_id, cfg.user_token_id, newline_id, th.audio_start_token_id]
           + [th.audio_token_id] * n_tok
           + [th.audio_end_token_id, cfg.im_end_token_id, newline_id, cfg.im_start_token_id,
              cfg.assistant_token_id, newline_id])
    return Prompt(token_ids=ids, audios=[wav])


def _underruns(events: list[tuple[float, int]], rate: int = 24000) -> int:
    """events: (arrival time s, samples) of each audio chunk → how often playback would have stalled."""
    if not events:
        return 0
    start = events[0][0]
    buffered_until = start  # playback clock: when the audio received so far runs out
    count = 0
    for t, n in events:
        if t > buffered_until + 1e-4:
            count += 1
            buffered_until = t
        buffered_until += n / rate
    return count


def _one(rt, prompt: Prompt, speaker: str, thinker: SamplingParams, talker: SamplingParams,
         results: list, index: int) -> None:
    t0 = time.perf_counter()
    events, metrics, error = [], {}, None
    try:
        for chunk in rt.stream(prompt, speaker=speaker, thinker=thinker, talker=talker):
            if chunk.audio.size:
                events.append((time.perf_counter(), chunk.audio.size))
            if chunk.finished:
                metrics = chunk.metrics or {}
    except Exception as e:  # recorded, the benchmark goes on
        error = repr(e)
    metrics = dict(metrics)
    metrics["wall_ms"] = (time.perf_counter() - t0) * 1000
    metrics["underruns"] = _underruns(events)
    metrics["error"] = error
    results[index] = metrics


def _quantiles(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"p50": None, "p90": None, "n": 0}
    return {"p50": float(np.percentile(vals, 50)), "p90": float(np.percentile(vals, 90)), "n": len(vals)}


def run_benchmark(rt, concurrency: list[int], seconds: float = 5.0, max_new_tokens: int = 32,
                  talker_max_new_tokens: int = 64, repeats: int = 1, warmup: bool = True) -> dict[str, Any]:
    """Run the end-to-end benchmark on a Runtime; returns a JSON-able report."""
    wav = spoken_question(seconds)
    prompt = question_prompt(rt.cfg, wav)
    thinker = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    talker = SamplingParams(temperature=0.0, max_new_tokens=talker_max_new_tokens)
    speakers = sorted(rt.cfg.talker.speaker_id) if rt.has_talker else ["ethan"]
    if warmup:
        _one(rt, prompt, speakers[0], thinker, talker, [None], 0)
    report: dict[str, Any] = {"question_seconds": seconds, "max_new_tokens": max_new_tokens,
                              "talker_max_new_tokens": talker_max_new_tokens, "levels": {}}
    for c in concurrency:
        runs: list[dict] = []
        for _ in range(repeats):
            results: list[Any] = [None] * c
            threads = [threading.Thread(target=_one, args=(rt, prompt, speakers[i % len(speakers)], thinker,
                                                           talker, results, i)) for i in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs.extend(results)
        keys = ["first_packet_ms", "thinker_ttft_ms", "thinker_tokens_per_s", "frames_per_s", "rtf", "total_ms",
                "underruns"]
        report["levels"][str(c)] = {k: _quantiles([r.get(k) for r in runs]) for k in keys}
        report["levels"][str(c)]["errors"] = [r["error"] for r in runs if r.get("error")]
    return report

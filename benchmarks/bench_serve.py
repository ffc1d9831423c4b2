"""Serving overhead: first audio delta over HTTP (``omni-rt serve``, SSE, the tiny checkpoint on CPU) vs the first
audio chunk of the in-process ``Runtime.stream()`` — same Runtime, same request, same run, alternating; medians and
their ratio in extra_info. Also runnable as a script: ``python benchmarks/bench_serve.py [rounds]``."""
from __future__ import annotations

import base64
import io
import json
import statistics
import sys
import time
import wave

import numpy as np
import pytest

import omni_rt
from omni_rt.bench import spoken_question

THINKER_TOKENS = 8
TALKER_TOKENS = 8


def _wav_b64(wav_16k):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(wav_16k, -1, 1) * 32767).round().astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def measure(rt, url: str, rounds: int) -> dict:
    import httpx

    wav = spoken_question(3.0)
    body = {"model": "tiny", "stream": True, "modalities": ["text", "audio"], "audio": {"voice": "ethan"},
            "temperature": 0, "max_tokens": THINKER_TOKENS, "talker": {"max_new_tokens": TALKER_TOKENS},
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": _wav_b64(wav), "format": "wav"}}]}]}
    pcm = (np.clip(wav, -1, 1) * 32767).round().astype("<i2")
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": omni_rt.audio.load(pcm, sr=16000)}]}]
    thinker = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=THINKER_TOKENS)
    talker = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=TALKER_TOKENS)

    def http_once(client) -> float:
        t0 = time.perf_counter()
        first = None
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if first is None and line.startswith("data: {") and '"data":' in line:
                    d = json.loads(line[6:])["choices"][0]["delta"]
                    if d.get("audio", {}).get("data"):
                        first = (time.perf_counter() - t0) * 1000
        return first

    def local_once() -> float:
        t0 = time.perf_counter()
        first = None
        for chunk in rt.stream(msgs, speaker="ethan", thinker=thinker, talker=talker):
            if first is None and chunk.audio.size:
                first = (time.perf_counter() - t0) * 1000
        return first

    http, local = [], []
    with httpx.Client(timeout=120) as client:
        http_once(client), local_once()  # warm-up
        for _ in range(rounds):
            http.append(http_once(client))
            local.append(local_once())
    h, l_ = statistics.median(http), statistics.median(local)
    return {"http_first_audio_ms_p50": h, "inprocess_first_audio_ms_p50": l_, "ratio_http_over_inprocess": h / l_,
            "overhead_ms": h - l_, "rounds": rounds, "http_ms": http, "inprocess_ms": local,
            "device": "cpu", "config": "tiny"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from omni_rt.serve.app import create_app
    from omni_rt.serve.live import live_server

    ckpt = omni_rt.testing.make_checkpoint(tmp_path_factory.mktemp("serve_tiny"), "tiny", seed=0)
    rt = omni_rt.Runtime(ckpt, device="cpu", max_batch_size=2)
    try:
        with live_server(create_app(rt, model_name="tiny")) as url:
            yield rt, url
    finally:
        rt.close()


@pytest.mark.benchmark(group="serve-cpu")
def test_first_audio_http_vs_inprocess(benchmark, served):
    rt, url = served
    report = benchmark.pedantic(lambda: measure(rt, url, rounds=3), rounds=1, iterations=1)
    benchmark.extra_info.update(report)


if __name__ == "__main__":
    from omni_rt.serve.app import create_app
    from omni_rt.serve.live import live_server
    import tempfile

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    with tempfile.TemporaryDirectory() as d:
        ckpt = omni_rt.testing.make_checkpoint(d, "tiny", seed=0)
        with omni_rt.Runtime(ckpt, device="cpu", max_batch_size=2) as rt:
            with live_server(create_app(rt, model_name="tiny")) as url:
                print(json.dumps(measure(rt, url, rounds), indent=1))

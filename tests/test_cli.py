"""The command line and the profiling switch, run for real on the tiny synthetic checkpoint."""
from __future__ import annotations

import json
import os
import wave

import numpy as np
import pytest

import omni_rt
from omni_rt.bench import _underruns
from omni_rt.cli import main


def test_demo_streams_and_writes_reply(tmp_path, capsys):
    out = tmp_path / "reply.wav"
    assert main(["demo", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", "6", "--talker-max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM" in text and "first packet" in text and "engine time per stage" in text
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        assert w.getnframes() == 11 * 1920 - 555  # 12 talker steps -> 11 frames


def test_bench_writes_json_per_concurrency(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--synthetic", "tiny", "--device", "cpu", "--concurrency", "1,2", "--seconds", "1.5",
                 "--max-new-tokens", "4", "--talker-max-new-tokens", "6", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert set(report["levels"]) == {"1", "2"}
    level = report["levels"]["2"]
    for key in ("first_packet_ms", "thinker_ttft_ms", "rtf", "underruns"):
        assert level[key]["n"] == 2 and level[key]["p50"] is not None
    assert level["errors"] == []
    assert report["model"] == "synthetic:tiny"


def test_underrun_count():
    # 1920 samples = 80 ms per chunk: arrivals every 50 ms never run dry; a 200 ms gap does once
    assert _underruns([(0.0, 1920), (0.05, 1920), (0.10, 1920)]) == 0
    assert _underruns([(0.0, 1920), (0.3, 1920), (0.35, 1920)]) == 1


def test_profile_dir_writes_a_trace(tiny_checkpoint, tmp_path):
    rt = omni_rt.Runtime(tiny_checkpoint, device="cpu", profile_dir=tmp_path / "trace")
    rt.generate(omni_rt.Prompt(token_ids=[449, 11, 198, 5, 450, 198, 449, 12, 198]),
                thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3), return_audio=False)
    rt.close()
    files = os.listdir(tmp_path / "trace")
    assert files and files[0].endswith(".json")
    trace = json.loads((tmp_path / "trace" / files[0]).read_text())
    assert trace["traceEvents"]


def test_run_requires_input(tiny_checkpoint):
    with pytest.raises(SystemExit, match="--audio and/or --text"):
        main(["run", "--model", tiny_checkpoint, "--device", "cpu"])


def test_run_answers_an_audio_file(tiny_checkpoint, tmp_path, capsys):
    from omni_rt.bench import ASSET

    out = tmp_path / "answer.wav"
    assert main(["run", "--model", tiny_checkpoint, "--audio", ASSET, "--text", "Answer briefly.",
                 "--speaker", "aiden", "--out", str(out), "--device", "cpu", "--max-new-tokens", "5",
                 "--talker-max-new-tokens", "9"]) == 0
    assert "first packet" in capsys.readouterr().out
    with wave.open(str(out)) as w:
        assert w.getnframes() == 8 * 1920 - 555

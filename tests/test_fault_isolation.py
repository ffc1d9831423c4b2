"""Fault isolation by construction: a failure inside any engine stage that is attributable to one request of a
batch fails that request alone; the step is rolled back (KV appends undone, nothing committed) and retried for
the others, which finish exactly as in their solo runs. A device fault stays sticky and shows in stats()."""
from __future__ import annotations

import numpy as np
import pytest

import omni_rt

from _fixtures import runtime_fixture

STAGES = ["audio_encode", "thinker_prefill", "thinker_decode", "talker_prefill", "talker_decode",
          "code_predictor_frame", "code2wav_step"]
G = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=8)
K = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10)


def prompt(*words):
    return omni_rt.Prompt(token_ids=[449, 11, 198, *words, 450, 198, 449, 12, 198])


JOBS = {"victim": prompt(5, 6, 7), "a": prompt(100, 200), "b": prompt(42, 43, 44, 45)}


rt = runtime_fixture(max_batch_size=4)


@pytest.fixture(scope="module")
def solo(rt):
    return {k: rt.generate(p, thinker=G, talker=K) for k, p in JOBS.items() if k != "victim"}


def _involves_victim(args) -> bool:
    reqs = args[0] if isinstance(args[0], list) else [args[0]]
    return any(r.request_id.startswith("victim") for r in reqs)


@pytest.mark.parametrize("stage", STAGES + ["code2wav_after_advance"])
def test_failure_in_each_stage_fails_only_that_request(rt, solo, stage, monkeypatch):
    stages = rt.engine.stages
    name = "code2wav_step" if stage == "code2wav_after_advance" else stage
    original = getattr(stages, name)

    def injected(*args):
        if stage == "code2wav_after_advance":
            out = original(*args)   # Code2Wav has computed (and earlier frames advanced) the victim's stream
            if _involves_victim(args) and any(r.vocoded for r in args[0] if r.request_id.startswith("victim")):
                raise ValueError(f"injected failure in {stage}")
            return out
        if _involves_victim(args):
            raise ValueError(f"injected failure in {stage}")
        return original(*args)

    monkeypatch.setattr(stages, name, injected)
    streams = {k: rt.stream(p, thinker=G, talker=K, request_id=f"{k}-{stage}") for k, p in JOBS.items()}
    results, errors = {}, {}
    for k, it in streams.items():
        text_ids, audio = [], []
        try:
            for c in it:
                text_ids += c.token_ids
                if c.audio.size:
                    audio.append(c.audio)
            results[k] = (text_ids, np.concatenate(audio) if audio else np.zeros(0, np.float32))
        except ValueError as e:
            errors[k] = e
    assert set(errors) == {"victim"} and "injected" in str(errors["victim"])
    for k in ("a", "b"):
        ids, audio = results[k]
        assert ids == solo[k].token_ids
        assert audio.shape == solo[k].audio.shape and np.abs(audio - solo[k].audio).max() <= 1e-5
    monkeypatch.undo()
    st = rt.stats()
    assert st["fault"] is None and st["running"] == 0 and st["waiting"] == 0
    assert st["kv_free_blocks"] == st["kv_total_blocks"]
    assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    assert st["speech_slots_free"] == st["speech_slots_total"]
    again = rt.generate(JOBS["a"], thinker=G, talker=K)   # still serving, slots reset
    assert again.token_ids == solo["a"].token_ids and np.array_equal(again.codes, solo["a"].codes)


def test_device_fault_is_reported_in_stats(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu") as broken:
        def explode(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        broken.engine.stages.talker_decode = explode
        with pytest.raises(omni_rt.DeviceFault):
            broken.generate(prompt(1, 2), thinker=G, talker=K)
        assert "CUDA error" in broken.stats()["fault"]

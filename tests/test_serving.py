"""Serving many at once (tiny checkpoint, CPU, fp32): mixed concurrent requests equal their solo runs, 100
partly-cancelled requests return every block and decoder slot, bad requests fail alone, a device fault is
sticky and fails everything in flight."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

import omni_rt
from omni_rt.bench import question_prompt, spoken_question
from omni_rt.errors import DeviceFault

from _tolerances import PARITY
from _fixtures import runtime_fixture


rt = runtime_fixture(max_batch_size=8)


def text_prompt(*words):
    return omni_rt.Prompt(token_ids=[449, 11, 198, *words, 450, 198, 449, 12, 198])


def all_free(rt) -> bool:
    st = rt.stats()
    return (st["kv_free_blocks"] == st["kv_total_blocks"]
            and st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
            and st["speech_slots_free"] == st["speech_slots_total"] and not st["running"] and not st["waiting"])


def wait_idle(rt, tries=500):
    for _ in range(tries):
        if all_free(rt):
            return True
        threading.Event().wait(0.01)
    return all_free(rt)


def _jobs(rt):
    q1 = question_prompt(rt.cfg, spoken_question(1.5))
    q2 = question_prompt(rt.cfg, spoken_question(3.2))
    g = lambda n: omni_rt.SamplingParams(temperature=0.0, max_new_tokens=n)  # noqa: E731
    return [
        dict(prompt=q1, speaker="ethan", thinker=g(6), talker=g(10)),
        dict(prompt=text_prompt(5, 6, 7), return_audio=False, thinker=g(9)),
        dict(prompt=q2, speaker="chelsie", thinker=g(8), talker=g(14)),
        dict(prompt=text_prompt(100, 200), speaker="aiden", thinker=g(5), talker=g(7)),
        dict(prompt=q1, speaker="aiden", thinker=omni_rt.SamplingParams(temperature=0.7, seed=3, max_new_tokens=6),
             talker=omni_rt.SamplingParams(seed=11, max_new_tokens=9)),
        dict(prompt=text_prompt(42), return_audio=False, thinker=g(12)),
        dict(prompt=q2, speaker="ethan", thinker=g(4), talker=g(12)),
        dict(prompt=text_prompt(300, 301, 302, 303), speaker="chelsie", thinker=g(7), talker=g(8)),
    ]


def test_eight_concurrent_mixed_requests_equal_solo(rt):
    jobs = _jobs(rt)
    solo = [rt.generate(**j) for j in jobs]
    results = [None] * len(jobs)

    def worker(i):
        results[i] = rt.generate(**jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, solo):
        assert a.token_ids == b.token_ids
        if b.codes is None:
            assert a.codes is None and a.audio is None
        else:
            assert np.array_equal(a.codes, b.codes)
            assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() <= PARITY["code2wav_abs"]
    assert wait_idle(rt)


def test_hundred_mixed_partly_cancelled_requests_free_everything(rt):
    rng = random.Random(0)
    jobs = _jobs(rt)
    errors = []

    def worker(i):
        job = dict(jobs[i % len(jobs)])
        job["request_id"] = f"r{i}"
        mode = rng.choice(["finish", "leave", "abort"])
        try:
            it = rt.stream(**job)
            for n, chunk in enumerate(it):
                if mode == "leave" and n == 2:
                    break
                if mode == "abort" and n == 1:
                    rt.abort(f"r{i}")
        except omni_rt.CancelledRequest:
            pass
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    for start in range(0, 100, 10):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(start, start + 10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert wait_idle(rt)


def test_bad_requests_fail_alone(rt):
    good = dict(prompt=text_prompt(9, 8), speaker="ethan", thinker=omni_rt.SamplingParams(temperature=0.0,
                max_new_tokens=6), talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=8))
    expected = rt.generate(**good)
    results, failures = {}, {}
    bad = {
        "bad_audio": dict(prompt=omni_rt.Prompt(token_ids=[480] * 13, audios=[np.full(16000, np.inf, np.float32)])),
        "speaker": dict(prompt=text_prompt(1), speaker="nobody"),
        "too_long": dict(prompt=text_prompt(1), thinker=omni_rt.SamplingParams(max_new_tokens=10**7)),
        "pad_mismatch": dict(prompt=omni_rt.Prompt(token_ids=[449, 480, 480], audios=[spoken_question(2.0)]),
                             return_audio=False),
    }

    def run(name, job):
        try:
            results[name] = rt.generate(**job)
        except Exception as e:  # noqa: BLE001
            failures[name] = e

    threads = [threading.Thread(target=run, args=(f"good{i}", good)) for i in range(3)]
    threads += [threading.Thread(target=run, args=(k, v)) for k, v in bad.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(failures) == set(bad), failures
    assert all(isinstance(e, ValueError) for e in failures.values())
    for i in range(3):
        r = results[f"good{i}"]
        assert r.token_ids == expected.token_ids and np.array_equal(r.codes, expected.codes)
    assert wait_idle(rt)


def test_host_error_in_one_requests_stage_fails_only_it(rt, monkeypatch):
    engine = rt.engine
    original = engine._push_token

    def flaky(req, token):
        if req.request_id == "victim":
            raise RuntimeError("feed construction failed for this request")
        return original(req, token)

    monkeypatch.setattr(engine, "_push_token", flaky)
    g = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=5)
    out = {}

    def run(rid):
        try:
            out[rid] = rt.generate(text_prompt(3, 4), thinker=g, talker=g, request_id=rid)
        except RuntimeError as e:
            out[rid] = e

    threads = [threading.Thread(target=run, args=(rid,)) for rid in ("victim", "ok1", "ok2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(out["victim"], RuntimeError)
    assert out["ok1"].token_ids == out["ok2"].token_ids and out["ok1"].codes is not None
    assert wait_idle(rt)


def test_device_fault_is_sticky(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu") as broken:
        def explode(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        broken.engine.stages.thinker_runner.decode = explode
        long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=50)
        with pytest.raises(DeviceFault, match="must be recreated"):
            broken.generate(text_prompt(1, 2), thinker=long, return_audio=False)
        with pytest.raises(DeviceFault):
            broken.generate(text_prompt(1, 2), thinker=long, return_audio=False)

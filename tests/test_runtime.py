"""The public API (api.md) on the tiny checkpoint, text-only variant: generate/stream/astream/abort, chat
messages through the tokenizer, request validation, KV accounting, and batching equal to solo runs."""
from __future__ import annotations

import asyncio
import json
import os
import threading

import numpy as np
import pytest
import torch

import omni_rt
from omni_rt.errors import CancelledRequest
from omni_rt.testing import make_checkpoint, tiny_config

from _fixtures import runtime_fixture

IM_START, IM_END, USER, ASSISTANT, NL = 449, 450, 11, 12, 198


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    cfg = tiny_config()
    cfg["enable_audio_output"] = False
    return make_checkpoint(tmp_path_factory.mktemp("tiny_text"), cfg, seed=0)


rt = runtime_fixture("text_ckpt", max_batch_size=4)


def prompt(*words):
    return omni_rt.Prompt(token_ids=[IM_START, USER, NL, *words, IM_END, NL, IM_START, ASSISTANT, NL])


GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=16)


def free_blocks(rt):
    st = rt.stats()
    return st["kv_free_blocks"], st["kv_total_blocks"]


def test_generate_text_only(rt):
    out = rt.generate(prompt(100, 200, 300), thinker=GREEDY)
    assert out.audio is None and out.codes is None and len(out.token_ids) >= 1
    assert out.text == rt.tokenizer.decode(out.token_ids)
    assert out.metrics["thinker_ttft_ms"] > 0 and out.metrics["total_ms"] >= out.metrics["thinker_ttft_ms"]
    assert isinstance(out.request_id, str) and out.request_id
    f, n = free_blocks(rt)
    assert f == n


def test_stream_deltas_join_to_text_and_equal_generate(rt):
    p = prompt(7, 8, 9)
    out = rt.generate(p, thinker=GREEDY)
    chunks = list(rt.stream(p, thinker=GREEDY, request_id="s1"))
    assert all(c.request_id == "s1" for c in chunks) and chunks[-1].finished
    assert "".join(c.text_delta for c in chunks) == out.text
    assert [t for c in chunks for t in c.token_ids] == out.token_ids


def test_multibyte_characters_split_across_tokens_stream_exactly(rt):
    tok = rt.tokenizer
    ids = tok.encode("Café 你好 🙂")
    assert len(ids) > len("Café 你好 🙂".encode()) // 4  # several tokens per character somewhere
    # Force the model to emit exactly these ids by making them the stop-free greedy path is not possible with
    # random weights, so check the detokenizer the engine uses, token by token.
    from omni_rt.tokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer(tok)
    deltas = [d.push([i]) for i in ids] + [d.push([], final=True)]
    assert "".join(deltas) == tok.decode(ids) == "Café 你好 🙂"
    assert all("\ufffd" not in x for x in deltas)


def test_chat_messages_render_and_match_prompt(rt):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is the weather like today?"}]}]
    via_messages = rt.generate(msgs, thinker=GREEDY)
    ids = rt.tokenizer.encode(rt.tokenizer.render([{"role": "user", "content": msgs[0]["content"]}]))
    assert ids[:3] == [IM_START, USER, NL] and ids[-3:] == [IM_START, ASSISTANT, NL]
    via_prompt = rt.generate(omni_rt.Prompt(token_ids=ids), thinker=GREEDY)
    assert via_messages.token_ids == via_prompt.token_ids


def test_chat_messages_with_audio_expand_pads(rt):
    wav = (0.1 * np.sin(np.arange(16000 * 2) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": wav}, {"type": "text", "text": "Hi"}]}]
    out = rt.generate(msgs, thinker=GREEDY)
    assert len(out.token_ids) >= 1
    # 2 s = 200 mel frames -> 26 audio tokens
    ids = rt._resolve_prompt(msgs).ids
    assert ids.count(480) == omni_rt.audio.num_audio_tokens(200) == 26


def test_batch_of_concurrent_requests_equals_solo(rt):
    prompts = [prompt(100 + i, 200 + 3 * i, 17) for i in range(6)]
    solo = [rt.generate(p, thinker=GREEDY).token_ids for p in prompts]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = rt.generate(prompts[i], thinker=GREEDY).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo
    f, n = free_blocks(rt)
    assert f == n


def test_leaving_the_stream_loop_cancels_and_frees(rt):
    long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=400, stop_token_ids=[])
    for chunk in rt.stream(prompt(5, 6), thinker=long, request_id="leave"):
        break
    # the abort is processed at the engine's next step
    for _ in range(200):
        if free_blocks(rt)[0] == free_blocks(rt)[1] and "leave" not in rt.engine.requests:
            break
        threading.Event().wait(0.01)
    f, n = free_blocks(rt)
    assert f == n and "leave" not in rt.engine.requests


def test_abort_by_request_id(rt):
    long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=400, stop_token_ids=[])
    it = rt.stream(prompt(5, 7), thinker=long, request_id="ab")
    next(it)
    assert rt.abort("ab")
    with pytest.raises(CancelledRequest):
        for _ in it:
            pass
    assert not rt.abort("no-such-request")


def test_astream_and_task_cancellation(rt):
    async def collect():
        return [c async for c in rt.astream(prompt(9, 9), thinker=GREEDY)]

    chunks = asyncio.run(collect())
    assert chunks[-1].finished
    assert [t for c in chunks for t in c.token_ids] == rt.generate(prompt(9, 9), thinker=GREEDY).token_ids

    async def cancel_midway():
        long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=5000, stop_token_ids=[])

        async def consume():
            async for _ in rt.astream(prompt(3, 4), thinker=long, request_id="acancel"):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    for _ in range(300):
        if "acancel" not in rt.engine.requests:
            break
        threading.Event().wait(0.01)
    assert "acancel" not in rt.engine.requests


def test_bad_requests_get_clear_errors_and_do_not_break_the_runtime(rt):
    with pytest.raises(ValueError, match="return_audio=False"):
        rt.generate(prompt(1), return_audio=True)
    with pytest.raises(ValueError, match="empty"):
        omni_rt.Prompt(token_ids=[])
    with pytest.raises(ValueError, match="top_p"):
        rt.generate(prompt(1), thinker=omni_rt.SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="max_model_len"):
        rt.generate(prompt(1), thinker=omni_rt.SamplingParams(max_new_tokens=10**6))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.generate(omni_rt.Prompt(token_ids=[IM_START, 10**5]), thinker=GREEDY)
    with pytest.raises(ValueError, match="audio_pad"):
        rt.generate(omni_rt.Prompt(token_ids=[IM_START, 480, 480]), thinker=GREEDY)
    with pytest.raises(ValueError, match="role"):
        rt.generate([{"role": "robot", "content": "hi"}], thinker=GREEDY)
    with pytest.raises(ValueError, match="NaN"):
        rt.generate(omni_rt.Prompt(token_ids=[480] * 13, audios=[np.full(16000, np.nan, np.float32)]),
                    thinker=GREEDY)
    # still serving
    assert rt.generate(prompt(2, 3), thinker=GREEDY).token_ids


def test_checkpoint_without_tokenizer_accepts_prompts_only(tmp_path):
    cfg = tiny_config()
    cfg["enable_audio_output"] = False
    path = make_checkpoint(tmp_path / "notok", cfg, with_tokenizer=False)
    with omni_rt.Runtime(path, device="cpu") as rt2:
        assert rt2.generate(prompt(1, 2), thinker=GREEDY).text == ""
        with pytest.raises(ValueError, match="no tokenizer files"):
            rt2.generate([{"role": "user", "content": "hi"}])


def test_back_pressure_waits_instead_of_failing(text_ckpt):
    """A KV pool that holds one request at a time: the others wait, then all finish correctly."""
    with omni_rt.Runtime(text_ckpt, device="cpu", kv_cache_tokens=64, kv_block_size=16, max_batch_size=4,
                         max_model_len=128) as small:
        p = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=[])
        solo = small.generate(prompt(100), thinker=p).token_ids
        results = [None] * 3

        def worker(i):
            results[i] = small.generate(prompt(100), thinker=p).token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [solo] * 3
        with pytest.raises(ValueError, match="KV blocks"):
            small.generate(prompt(*range(30)), thinker=omni_rt.SamplingParams(max_new_tokens=60))


def test_runtime_with_triton_forced_under_interpreter_matches(text_ckpt, monkeypatch):
    """The whole text path (AuT on the block-window kernel, thinker on kv_write / prefill / paged decode /
    fused MoE) through the engine thread with every Triton kernel forced on under the interpreter."""
    wav = (0.1 * np.sin(np.arange(16000) * 2 * np.pi * 330 / 16000)).astype(np.float32)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": wav}, {"type": "text", "text": "Hi"}]}]
    p = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3)
    with omni_rt.Runtime(text_ckpt, device="cpu") as plain:
        expected = plain.generate(msgs, thinker=p).token_ids
    monkeypatch.setenv("OMNI_RT_FORCE_TRITON", "1")  # read per call, so the engine thread sees it too
    with omni_rt.Runtime(text_ckpt, device="cpu") as forced:
        assert forced.generate(msgs, thinker=p).token_ids == expected


def test_close_ends_streams_in_flight(text_ckpt):
    rt2 = omni_rt.Runtime(text_ckpt, device="cpu")
    long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=5000, stop_token_ids=[])
    it = rt2.stream(prompt(1, 2), thinker=long)
    next(it)
    rt2.close()
    with pytest.raises(RuntimeError, match="closed"):
        for _ in it:
            pass

"""Runtime lifecycle (issue 12 item 3): context manager, close() ends everything and frees memory, calls after
close raise at once (sync and async, no thread left behind), dropped streams cancel their request, an unclosed
runtime that is collected stops its engine thread, and interpreter exit with requests in flight exits 0."""
from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest

import omni_rt
from omni_rt.testing import make_checkpoint, tiny_config

IM_START, IM_END, USER, ASSISTANT, NL = 449, 450, 11, 12, 198
GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3)
LONG = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4000, stop_token_ids=[])


def prompt(*words):
    return omni_rt.Prompt(token_ids=[IM_START, USER, NL, *words, IM_END, NL, IM_START, ASSISTANT, NL])


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    cfg = tiny_config()
    cfg["enable_audio_output"] = False
    return make_checkpoint(tmp_path_factory.mktemp("tiny_text_life"), cfg, seed=0)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "omni_rt-engine"]


def wait_until(cond, what: str, tries: int = 2000) -> None:
    """Poll a condition the engine thread will make true (a bound on patience, not a timing assertion)."""
    ev = threading.Event()
    for _ in range(tries):
        if cond():
            return
        ev.wait(0.01)
    raise AssertionError(f"never happened: {what}")


def test_context_manager_and_every_call_after_close_raises_at_once(text_ckpt):
    before = set(threading.enumerate())
    with omni_rt.Runtime(text_ckpt, device="cpu") as rt:
        assert rt.generate(prompt(1), thinker=GREEDY).token_ids
        thread = rt.engine._thread
    assert rt.closed and not thread.is_alive() and rt.engine is None and rt.model is None
    rt.close()  # idempotent
    for call in (lambda: rt.generate(prompt(1)), lambda: rt.stream(prompt(1)), lambda: rt.astream(prompt(1)),
                 lambda: rt.abort("x"), lambda: rt.encode_audio("nothing.wav"),
                 lambda: rt.stage_times(), lambda: rt.__enter__()):
        with pytest.raises(RuntimeError, match="closed"):
            call()

    async def use_async():
        async for _ in rt.astream(prompt(1)):
            pass

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(use_async())
    # no engine thread and no executor thread left behind
    assert set(threading.enumerate()) <= before


def test_close_fails_in_flight_and_queued_requests_and_frees_memory(text_ckpt):
    rt = omni_rt.Runtime(text_ckpt, device="cpu", max_batch_size=1)
    kv = weakref.ref(rt.engine.stages.thinker_pool.kv)
    engine = weakref.ref(rt.engine)
    running = rt.stream(prompt(1, 2), thinker=LONG)
    next(running)                                     # admitted and decoding
    queued = rt.stream(prompt(3), thinker=LONG)       # waits for the only batch slot

    async def consume():
        chunks = 0
        async for _ in rt.astream(prompt(4), thinker=LONG):
            chunks += 1
        return chunks

    results = {}

    def run_async():
        try:
            results["async"] = asyncio.run(consume())
        except BaseException as e:  # noqa: BLE001
            results["async"] = e

    t = threading.Thread(target=run_async)
    t.start()
    wait_until(lambda: rt.stats()["waiting"] == 2, "two requests queued")
    rt.close()
    for s in (running, queued):
        with pytest.raises(RuntimeError, match="closed before this request finished"):
            for _ in s:
                pass
    t.join(timeout=60)
    assert not t.is_alive()
    assert isinstance(results["async"], RuntimeError) and "closed" in str(results["async"])
    st = rt.stats()   # still answers after close: the state the runtime was left in
    assert st["kv_free_blocks"] == st["kv_total_blocks"] and st["running"] == st["waiting"] == 0
    del running, queued
    gc.collect()
    assert engine() is None and kv() is None    # weights, KV pages and decoder state are released


def test_threads_submitting_while_close_runs_never_hang(text_ckpt):
    rt = omni_rt.Runtime(text_ckpt, device="cpu", max_batch_size=2)
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def worker(i):
        started.wait()
        for _ in range(50):
            try:
                rt.generate(prompt(i + 1), thinker=GREEDY)
                outcomes.append("ok")
            except RuntimeError as e:
                assert "closed" in str(e), e
                outcomes.append("closed")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    wait_until(lambda: len(outcomes) >= 2, "some requests served")
    rt.close()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert outcomes.count("closed") == 4


def test_dropped_streams_cancel_their_request(text_ckpt):
    with omni_rt.Runtime(text_ckpt, device="cpu") as rt:
        s = rt.stream(prompt(1), thinker=LONG, request_id="never-read")
        req = rt.engine.requests["never-read"]
        del s                                   # never iterated: weakref.finalize aborts it
        assert req.cancelled
        s = rt.stream(prompt(2), thinker=LONG, request_id="read-once")
        next(s)
        req = rt.engine.requests["read-once"]
        del s
        assert req.cancelled
        for _ in rt.stream(prompt(3), thinker=LONG, request_id="left-early"):
            break                               # leaving the loop drops the handle
        wait_until(lambda: not rt.engine.requests, "aborted requests released")

        async def leave_async_early():
            agen = rt.astream(prompt(4), thinker=LONG, request_id="async-left")
            await agen.__anext__()
            r = rt.engine.requests["async-left"]
            del agen
            return r

        assert asyncio.run(leave_async_early()).cancelled

        async def cancel_task():
            async def consume():
                async for _ in rt.astream(prompt(5), thinker=LONG, request_id="async-cancelled"):
                    pass
            task = asyncio.ensure_future(consume())
            while "async-cancelled" not in rt.engine.requests:
                await asyncio.sleep(0.01)
            r = rt.engine.requests["async-cancelled"]
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return r

        assert asyncio.run(cancel_task()).cancelled
        wait_until(lambda: not rt.engine.requests, "aborted requests released")
        st = rt.stats()
        assert st["kv_free_blocks"] == st["kv_total_blocks"] and st["running"] == st["waiting"] == 0
        # a finished stream's id can be reused: its handle never aborts the new request
        done = rt.stream(prompt(6), thinker=GREEDY, request_id="reused")
        list(done)
        again = rt.stream(prompt(6), thinker=LONG, request_id="reused")
        del done
        assert not rt.engine.requests["reused"].cancelled
        again.close()
        # a refused submit (same id in flight) leaves no handle behind that could abort the running one
        first = rt.stream(prompt(7), thinker=LONG, request_id="dup")
        with pytest.raises(ValueError, match="already in flight"):
            rt.stream(prompt(7), thinker=LONG, request_id="dup")
        gc.collect()
        assert not rt.engine.requests["dup"].cancelled
        first.close()
        assert rt.engine.requests["dup"].cancelled


def test_unclosed_runtime_is_collected_and_stops_its_thread(text_ckpt):
    before = len(engine_threads())
    rt = omni_rt.Runtime(text_ckpt, device="cpu")
    thread = rt.engine._thread
    engine = weakref.ref(rt.engine)
    s = rt.stream(prompt(1), thinker=LONG)
    next(s)
    with pytest.warns(ResourceWarning, match="not closed"):
        del rt
        gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive() and len(engine_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        list(s)
    del s
    gc.collect()
    assert engine() is None


def test_interpreter_exit_with_requests_in_flight_exits_cleanly(text_ckpt):
    script = textwrap.dedent(f"""
        import threading, omni_rt
        rt = omni_rt.Runtime({text_ckpt!r}, device="cpu", max_batch_size=2)
        long = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4000, stop_token_ids=[])
        p = omni_rt.Prompt(token_ids=[449, 11, 198, 5, 450, 198, 449, 12, 198])
        s = rt.stream(p, thinker=long)
        next(s)
        queued = [rt.stream(p, thinker=long) for _ in range(3)]
        threading.Thread(target=lambda: rt.generate(p, thinker=long), daemon=True).start()
        print("exiting", flush=True)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exiting" in proc.stdout and "terminate called" not in proc.stderr

"""``/v1/realtime`` with a WebSocket client speaking the documented OpenAI Realtime events, on a live server (tiny
checkpoint, CPU): a full spoken turn with server_vad (speech_started/stopped within ±100 ms of the clip's known
boundaries, then committed, a response with audio and transcript deltas, response.done), a manual turn, a cancel,
a barge-in, multi-turn memory, the beta event names, and errors."""
from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ws_sync = pytest.importorskip("websockets.sync.client")
pytest.importorskip("silero_vad")

from omni_rt.serve.app import create_app  # noqa: E402

from omni_rt.serve.live import live_server  # noqa: E402

from _fixtures import runtime_fixture  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
TIMEOUT = 120


def clip() -> tuple[np.ndarray, dict]:
    import wave

    with wave.open(os.path.join(DATA, "vad_clip.wav")) as w:
        assert w.getframerate() == 24000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    with open(os.path.join(DATA, "vad_clip.json")) as f:
        return pcm, json.load(f)


rt = runtime_fixture(max_batch_size=2)


@pytest.fixture(scope="module")
def url(rt):
    # long replies (up to 200 talker steps) so that a cancel or a barge-in lands while the response still plays
    with live_server(create_app(rt, model_name="tiny", talker_max_new_tokens=200)) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime"


@pytest.fixture(scope="module")
def short_url(rt):
    # short replies (8 talker steps) for the turns that run to completion
    with live_server(create_app(rt, model_name="tiny", talker_max_new_tokens=8)) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime"


class Client:
    def __init__(self, url, **kw):
        self.ws = ws_sync.connect(url, open_timeout=30, max_size=None, **kw)
        self.events: list[dict] = []

    def send(self, type, **fields):
        self.ws.send(json.dumps({"type": type, **fields}))

    def recv(self, timeout=TIMEOUT) -> dict:
        ev = json.loads(self.ws.recv(timeout=timeout))
        self.events.append(ev)
        return ev

    def until(self, *types, timeout=TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ev = self.recv(timeout=max(0.1, deadline - time.monotonic()))
            if ev["type"] in types:
                return ev
            assert ev["type"] != "error", ev

    def append(self, pcm: np.ndarray, chunk_ms=100):
        step = 24 * chunk_ms
        for i in range(0, pcm.size, step):
            self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[i:i + step].tobytes()).decode())

    def close(self):
        self.ws.close()


def kv_free(rt, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = rt.stats()
        if s["kv_free_blocks"] == s["kv_total_blocks"] and s["running"] == 0 and \
                s["talker_kv_free_blocks"] == s["talker_kv_total_blocks"]:
            return True
        time.sleep(0.02)
    return False


def test_full_spoken_turn_with_server_vad(short_url, rt):
    pcm, meta = clip()
    c = Client(short_url)
    try:
        assert c.recv()["type"] == "session.created"
        c.send("session.update", session={"type": "realtime", "output_modalities": ["audio"],
                                          "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                 "silence_duration_ms": 500}},
                                                    "output": {"voice": "chelsie"}},
                                          "max_output_tokens": 8, "unknown_field": {"ignored": True}})
        upd = c.until("session.updated")
        assert upd["session"]["audio"]["output"]["voice"] == "chelsie"
        c.append(pcm)
        started = c.until("input_audio_buffer.speech_started")
        stopped = c.until("input_audio_buffer.speech_stopped")
        assert abs(started["audio_start_ms"] - meta["speech_start_ms"]) <= 100, (started, meta)
        assert abs(stopped["audio_end_ms"] - meta["speech_end_ms"]) <= 100, (stopped, meta)
        committed = c.until("input_audio_buffer.committed")
        assert committed["item_id"] == stopped["item_id"]
        created = c.until("response.created")
        done = c.until("response.done")
        assert done["response"]["status"] == "completed" and done["response"]["id"] == created["response"]["id"]
        types = [e["type"] for e in c.events]
        audio = [e for e in c.events if e["type"] == "response.output_audio.delta"]
        transcript = "".join(e["delta"] for e in c.events if e["type"] == "response.output_audio_transcript.delta")
        assert audio and all(base64.b64decode(e["delta"]) for e in audio)
        assert types.index("response.output_audio.delta") > types.index("response.created")
        assert done["response"]["output"][0]["content"][0]["transcript"] == transcript
        assert 1 <= done["response"]["usage"]["output_tokens"] <= 8
        # the conversation is kept: a text turn on top of the spoken one answers in the same session
        c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                 "content": [{"type": "input_text", "text": "Thank you."}]})
        c.until("conversation.item.added")
        c.send("response.create", response={"output_modalities": ["text"]})
        done2 = c.until("response.done")
        assert done2["response"]["status"] == "completed"
        assert any(e["type"] == "response.output_text.delta" for e in c.events)
    finally:
        c.close()
    assert kv_free(rt)


def test_manual_commit_and_cancel(url, rt):
    pcm, _ = clip()
    c = Client(url)
    try:
        c.until("session.created")
        c.send("session.update", session={"turn_detection": None, "modalities": ["text", "audio"], "voice": "ethan",
                                          "max_response_output_tokens": 64})
        c.until("session.updated")
        c.append(pcm)
        c.send("input_audio_buffer.commit")
        c.until("input_audio_buffer.committed")
        c.send("response.create")
        c.until("response.audio.delta", "response.output_audio.delta")    # it is speaking: now cancel
        assert not kv_free(rt, seconds=0)
        c.send("response.cancel")
        done = c.until("response.done")
        assert done["response"]["status"] == "cancelled"
        assert kv_free(rt)
        c.send("response.cancel")       # nothing to cancel now: an error event, the session goes on
        err = c.until("error")
        assert err["error"]["code"] == "response_cancel_not_active"
    except AssertionError:
        raise
    finally:
        c.close()


def test_beta_names_and_barge_in(url, rt):
    pcm, meta = clip()
    c = Client(url, additional_headers={"OpenAI-Beta": "realtime=v1"})
    try:
        c.until("session.created")
        c.send("session.update", session={"modalities": ["audio", "text"], "voice": "aiden",
                                          "turn_detection": {"type": "server_vad"},
                                          "max_response_output_tokens": 64})
        c.until("session.updated")
        c.append(pcm)
        first = c.until("response.created")
        c.until("response.audio.delta")               # the reply plays (beta names) ...
        c.append(pcm)                                  # ... and the user speaks again: barge-in
        started = c.until("input_audio_buffer.speech_started")
        assert not any(e["type"] == "response.done" for e in c.events), "the reply ended before the barge-in"
        done = c.until("response.done")
        assert done["response"]["id"] == first["response"]["id"] and done["response"]["status"] == "cancelled"
        assert started["audio_start_ms"] > meta["speech_end_ms"]
        # the new turn is answered
        c.until("input_audio_buffer.speech_stopped")
        second = c.until("response.created")
        assert second["response"]["id"] != first["response"]["id"]
        c.send("response.cancel")
        c.until("response.done")
        beta_only = {e["type"] for e in c.events if e["type"].startswith(("response.output_audio",
                                                                          "response.output_text"))}
        assert not beta_only and any(e["type"] == "response.audio.delta" for e in c.events)
    finally:
        c.close()
    assert kv_free(rt)


def test_bad_events_are_error_events(short_url):
    c = Client(short_url)
    try:
        c.until("session.created")
        c.send("input_audio_buffer.append", audio="%%%")
        assert c.until("error")["error"]["param"] == "audio"
        c.send("session.update", session={"voice": "nobody"})
        assert "voice" in c.until("error")["error"]["message"]
        c.send("no.such.event")
        assert c.until("error")["error"]["code"] == "unsupported_event"
        c.send("input_audio_buffer.commit")
        assert c.until("error")["error"]["code"] == "input_audio_buffer_commit_empty"
        c.ws.send("not json")
        assert c.until("error")["error"]["code"] == "invalid_json"
        c.send("input_audio_buffer.append", audio=base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode())
        c.send("input_audio_buffer.clear")
        c.until("input_audio_buffer.cleared")
    finally:
        c.close()

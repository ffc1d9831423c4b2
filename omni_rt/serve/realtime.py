"""``/v1/realtime``: a subset of the OpenAI Realtime API over a WebSocket, on the same Runtime.

Client events: ``session.update`` (voice, modalities / output_modalities, instructions, turn_detection null or
server_vad; GA ``session.audio.*`` and beta flat shapes; unknown fields ignored), ``input_audio_buffer.append`` /
``commit`` / ``clear`` (PCM16 base64 at 24 kHz, resampled to the model's 16 kHz), ``conversation.item.create``
(text or audio message), ``response.create``, ``response.cancel``.
Server events: ``session.created`` / ``session.updated``, ``input_audio_buffer.speech_started`` / ``speech_stopped`` /
``committed`` / ``cleared``, ``conversation.item.created`` (beta) or ``conversation.item.added`` (GA),
``response.created``, ``response.output_audio.delta`` / ``response.output_audio_transcript.delta`` /
``response.output_text.delta`` (beta names ``response.audio.delta`` / ``response.audio_transcript.delta`` /
``response.text.delta`` when the client speaks the beta protocol: ``OpenAI-Beta: realtime=v1`` or a session without
``type``), their ``.done`` events, ``response.done`` (status completed | cancelled | failed) and ``error``.
The conversation is kept per connection (multi-turn). With server_vad, a stop of speech commits the buffer and starts
a response; speech that starts while a response plays cancels it (barge-in).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid

import numpy as np

from omni_rt import audio as audio_mod

from .errors import ApiError
from .media import pcm16_bytes

IN_RATE = 24000   # the Realtime API's PCM16 rate


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeSession:
    def __init__(self, ws, state, beta: bool):
        self.ws, self.state, self.beta = ws, state, beta
        self.id = _id("sess")
        self.voice = None
        self.modalities = ["text", "audio"]
        self.instructions = ""
        self.turn_detection: dict | None = None
        self.max_output_tokens: int | None = None
        self.temperature: float | None = None
        self.vad = None
        self.buffer: list[np.ndarray] = []      # float32 16 kHz pieces since the last commit/clear
        self.buffer_ms = 0.0                     # audio received this session (16 kHz samples → ms)
        self.conversation: list[dict] = []       # Runtime chat messages
        self.response: asyncio.Task | None = None
        self.response_id: str | None = None
        self.send_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ plumbing
    async def send(self, event: dict) -> None:
        event.setdefault("event_id", _id("event"))
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event, separators=(",", ":")))

    async def error(self, message: str, code: str = "invalid_request_error", param: str | None = None,
                    event_id: str | None = None) -> None:
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message,
                                                    "param": param, "event_id": event_id}})

    def _name(self, ga: str, beta: str) -> str:
        return beta if self.beta else ga

    def session_object(self) -> dict:
        td = self.turn_detection
        if self.beta:
            return {"id": self.id, "object": "realtime.session", "model": self.state.model_name,
                    "modalities": self.modalities, "voice": self.voice, "instructions": self.instructions,
                    "input_audio_format": "pcm16", "output_audio_format": "pcm16", "turn_detection": td}
        return {"id": self.id, "object": "realtime.session", "type": "realtime", "model": self.state.model_name,
                "output_modalities": ["audio"] if "audio" in self.modalities else ["text"],
                "instructions": self.instructions,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": IN_RATE}, "turn_detection": td},
                          "output": {"format": {"type": "audio/pcm", "rate": IN_RATE}, "voice": self.voice}}}

    # ------------------------------------------------------------------------------------------ events
    async def on_session_update(self, ev: dict) -> None:
        s = ev.get("session")
        if not isinstance(s, dict):
            raise ApiError(400, "session.update needs a 'session' object", param="session")
        if "type" in s:           # GA shape
            self.beta = False
        audio = s.get("audio") if isinstance(s.get("audio"), dict) else {}
        out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        inp = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        voice = out.get("voice", s.get("voice"))
        speakers = self.state.rt.speakers
        if voice is not None:
            if str(voice).lower() not in speakers:
                raise ApiError(400, f"voice must be one of {speakers}, got {voice!r}", param="session.voice")
            self.voice = str(voice).lower()
        mods = s.get("output_modalities", s.get("modalities"))
        if mods is not None:
            if not isinstance(mods, list) or not set(mods) <= {"text", "audio"} or not mods:
                raise ApiError(400, f"modalities must be a list of 'text'/'audio', got {mods!r}", param="session.modalities")
            if "audio" in mods and not speakers:
                raise ApiError(400, "this model has no talker: text output only", param="session.modalities")
            self.modalities = ["text", "audio"] if "audio" in mods else ["text"]
        if isinstance(s.get("instructions"), str):
            self.instructions = s["instructions"]
        for key in ("max_response_output_tokens", "max_output_tokens"):
            v = s.get(key)
            if isinstance(v, int) and v >= 1:
                self.max_output_tokens = v
            elif v == "inf":
                self.max_output_tokens = None
        if isinstance(s.get("temperature"), (int, float)):
            self.temperature = float(s["temperature"])
        fmt = inp.get("format", s.get("input_audio_format"))
        if fmt is not None and fmt != "pcm16" and not (isinstance(fmt, dict) and fmt.get("type") == "audio/pcm"
                                                       and fmt.get("rate", IN_RATE) == IN_RATE):
            raise ApiError(400, f"input audio format must be pcm16 at {IN_RATE} Hz, got {fmt!r}",
                           param="session.input_audio_format")
        has_td = "turn_detection" in inp or "turn_detection" in s
        if has_td:
            td = inp["turn_detection"] if "turn_detection" in inp else s["turn_detection"]
            if td is None:
                self.turn_detection, self.vad = None, None
            elif isinstance(td, dict) and td.get("type", "server_vad") == "server_vad":
                from .vad import StreamingVad

                threshold = float(td.get("threshold", self.state.realtime_options.get("vad_threshold", 0.5)))
                silence = int(td.get("silence_duration_ms", 500))
                try:
                    vad = StreamingVad(threshold, silence)
                except ImportError as e:
                    raise ApiError(400, str(e), param="session.turn_detection") from None
                except ValueError as e:
                    raise ApiError(400, str(e), param="session.turn_detection") from None
                # the VAD clock starts where the session's audio is now
                vad.offset_ms = self.buffer_ms
                self.vad = vad
                self.turn_detection = {"type": "server_vad", "threshold": threshold, "silence_duration_ms": silence,
                                       "prefix_padding_ms": int(td.get("prefix_padding_ms", 300)),
                                       "create_response": bool(td.get("create_response", True)),
                                       "interrupt_response": bool(td.get("interrupt_response", True))}
            else:
                raise ApiError(400, f"turn_detection must be null or server_vad, got {td!r}",
                               param="session.turn_detection")
        await self.send({"type": "session.updated", "session": self.session_object()})

    async def on_append(self, ev: dict) -> None:
        data = ev.get("audio")
        if not isinstance(data, str):
            raise ApiError(400, "input_audio_buffer.append needs base64 'audio'", param="audio")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "audio is not valid base64", param="audio") from None
        if len(raw) % 2:
            raise ApiError(400, "pcm16 audio must have an even number of bytes", param="audio")
        if not raw:
            return
        pcm = np.frombuffer(raw, dtype="<i2")
        total = sum(b.size for b in self.buffer) / audio_mod.SAMPLE_RATE + pcm.size / IN_RATE
        if total > self.state.limits.max_audio_seconds:
            raise ApiError(413, f"the input audio buffer exceeds {self.state.limits.max_audio_seconds:g} s; commit "
                           f"or clear it", param="audio", code="payload_too_large")
        wav = _resample_24k_to_16k(pcm)
        self.buffer.append(wav)
        self.buffer_ms += wav.size * 1000.0 / audio_mod.SAMPLE_RATE
        if self.vad is not None:
            events = await asyncio.get_running_loop().run_in_executor(None, self.vad.push, wav)
            for kind, ms in events:
                ms = ms + self.vad.offset_ms
                if kind == "start":
                    item = _id("item")
                    self.pending_item = item
                    await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(ms),
                                     "item_id": item})
                    if self.response is not None and not self.response.done() and \
                            self.turn_detection.get("interrupt_response", True):
                        await self.cancel_response()      # barge-in: the user talks over the reply
                else:
                    item = getattr(self, "pending_item", None) or _id("item")
                    await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(ms),
                                     "item_id": item})
                    await self.commit(item, previous=None)
                    if self.turn_detection.get("create_response", True):
                        await self.start_response({})

    async def commit(self, item_id: str | None = None, previous: str | None = None) -> None:
        if not self.buffer:
            raise ApiError(400, "the input audio buffer is empty", code="input_audio_buffer_commit_empty")
        wav = np.concatenate(self.buffer)
        self.buffer = []
        if wav.size < audio_mod.SAMPLE_RATE // 10:
            raise ApiError(400, f"the input audio buffer holds {wav.size * 1000 // audio_mod.SAMPLE_RATE} ms; at least "
                           f"100 ms are needed", code="input_audio_buffer_commit_empty")
        item_id = item_id or _id("item")
        self.conversation.append({"role": "user", "content": [{"type": "audio", "audio": wav}]})
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        await self.item_created(item_id, "user", [{"type": "input_audio", "transcript": None}])

    async def item_created(self, item_id: str, role: str, content: list) -> None:
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
                "content": content}
        await self.send({"type": self._name("conversation.item.added", "conversation.item.created"), "item": item,
                         "previous_item_id": None})

    async def on_item_create(self, ev: dict) -> None:
        item = ev.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ApiError(400, "conversation.item.create supports message items", param="item")
        role = item.get("role")
        if role not in ("user", "system", "assistant"):
            raise ApiError(400, f"item.role must be user, system or assistant, got {role!r}", param="item.role")
        parts, shown = [], []
        for j, c in enumerate(item.get("content") or []):
            kind = c.get("type") if isinstance(c, dict) else None
            if kind in ("input_text", "text", "output_text"):
                if not isinstance(c.get("text"), str):
                    raise ApiError(400, f"item.content[{j}].text must be a string", param=f"item.content[{j}]")
                parts.append({"type": "text", "text": c["text"]})
                shown.append({"type": kind, "text": c["text"]})
            elif kind == "input_audio":
                try:
                    raw = base64.b64decode(c.get("audio") or "", validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, "item audio is not valid base64", param=f"item.content[{j}].audio") from None
                if not raw or len(raw) % 2:
                    raise ApiError(400, "item audio must be non-empty pcm16", param=f"item.content[{j}].audio")
                parts.append({"type": "audio", "audio": _resample_24k_to_16k(np.frombuffer(raw, dtype="<i2"))})
                shown.append({"type": "input_audio", "transcript": None})
            else:
                raise ApiError(400, f"item.content[{j}].type must be input_text or input_audio, got {kind!r}",
                               param=f"item.content[{j}].type")
        if not parts:
            raise ApiError(400, "item.content is empty", param="item.content")
        self.conversation.append({"role": role, "content": parts})
        await self.item_created(item.get("id") or _id("item"), role, shown)

    # ------------------------------------------------------------------------------------------ responses
    async def start_response(self, ev: dict) -> None:
        if self.response is not None and not self.response.done():
            raise ApiError(400, "a response is already in progress; cancel it first",
                           code="conversation_already_has_active_response")
        if not self.conversation:
            raise ApiError(400, "the conversation is empty: append audio or create an item first")
        resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
        mods = resp.get("output_modalities", resp.get("modalities")) or self.modalities
        audio = "audio" in mods
        self.state.acquire()
        rid = _id("resp")
        self.response_id = rid
        self.response = asyncio.ensure_future(self._run_response(rid, audio, resp.get("instructions")))

    async def _run_response(self, rid: str, audio: bool, instructions: str | None) -> None:
        import omni_rt

        rt = self.state.rt
        item_id = _id("item")
        base = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        status, text, frames, err, n_tokens = "completed", [], 0, None, 0
        instr = instructions if isinstance(instructions, str) else self.instructions
        messages = ([{"role": "system", "content": [{"type": "text", "text": instr}]}] if instr else []) \
            + self.conversation
        greedy = self.temperature == 0
        thinker = omni_rt.SamplingParams(temperature=0.0 if greedy else None, max_new_tokens=self.max_output_tokens)
        talker = omni_rt.SamplingParams(temperature=0.0 if greedy else None,
                                        max_new_tokens=self.state.talker_max_new_tokens) if audio else None
        try:
            await self.send({"type": "response.created", "response": {"id": rid, "object": "realtime.response",
                                                                      "status": "in_progress", "output": []}})
            await self.send({"type": "response.output_item.added", "response_id": rid, "output_index": 0,
                             "item": {"id": item_id, "object": "realtime.item", "type": "message",
                                      "role": "assistant", "status": "in_progress", "content": []}})
            agen = rt.astream(messages, speaker=self.voice or (rt.speakers[0] if rt.speakers else "ethan"),
                              return_audio=audio, thinker=thinker, talker=talker, request_id=rid)
            try:
                async for c in agen:
                    n_tokens += len(c.token_ids)
                    if c.text_delta:
                        text.append(c.text_delta)
                        name = (self._name("response.output_audio_transcript.delta", "response.audio_transcript.delta")
                                if audio else self._name("response.output_text.delta", "response.text.delta"))
                        await self.send({"type": name, **base, "delta": c.text_delta})
                    if c.audio.size:
                        await self.send({"type": self._name("response.output_audio.delta", "response.audio.delta"),
                                         **base, "delta": base64.b64encode(pcm16_bytes(c.audio)).decode()})
                    if c.finished:
                        frames = int((c.metrics or {}).get("frames") or 0)
            finally:
                await agen.aclose()
        except asyncio.CancelledError:
            status = "cancelled"
            rt.abort(rid)
        except Exception as e:  # noqa: BLE001 - a failed response is reported; the session goes on
            status, err = "failed", e
        finally:
            self.state.release()
        transcript = "".join(text)
        if transcript or status == "completed":
            self.conversation.append({"role": "assistant", "content": [{"type": "text", "text": transcript}]})
        try:
            if err is not None:
                await self.error(f"{type(err).__name__}: {err}", code="response_failed")
            if status == "completed":
                if audio:
                    await self.send({"type": self._name("response.output_audio.done", "response.audio.done"), **base})
                    await self.send({"type": self._name("response.output_audio_transcript.done",
                                                        "response.audio_transcript.done"), **base,
                                     "transcript": transcript})
                else:
                    await self.send({"type": self._name("response.output_text.done", "response.text.done"), **base,
                                     "text": transcript})
            content = [{"type": "output_audio" if audio else "output_text",
                        ("transcript" if audio else "text"): transcript}]
            item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                    "status": "completed" if status == "completed" else "incomplete", "content": content}
            await self.send({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": item})
            await self.send({"type": "response.done", "response": {
                "id": rid, "object": "realtime.response", "status": status, "output": [item],
                "status_details": None if status == "completed" else {"type": status},
                "usage": {"output_tokens": n_tokens, "output_token_details": {"text_tokens": n_tokens,
                                                                            "audio_tokens": frames}}}})
        except Exception:  # noqa: BLE001 - the socket is gone
            pass

    async def cancel_response(self) -> bool:
        task = self.response
        if task is None or task.done():
            return False
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return True


def _resample_24k_to_16k(pcm: np.ndarray) -> np.ndarray:
    return audio_mod.load(pcm, sr=IN_RATE)


async def realtime_endpoint(ws, state) -> None:
    from starlette.websockets import WebSocketDisconnect

    from .app import _check_auth

    try:
        _check_auth(state, ws.headers)
    except ApiError as e:
        await ws.close(code=1008, reason=e.message)
        return
    await ws.accept()
    beta = "realtime=v1" in (ws.headers.get("openai-beta") or "")
    session = RealtimeSession(ws, state, beta)
    try:
        rt = state.runtime()
    except ApiError as e:
        await session.error(e.message, code=e.code or "server_error")
        await ws.close()
        return
    session.voice = rt.speakers[0] if rt.speakers else None
    if not rt.speakers:
        session.modalities = ["text"]
    await session.send({"type": "session.created", "session": session.session_object()})
    handlers = {
        "session.update": session.on_session_update,
        "input_audio_buffer.append": session.on_append,
        "input_audio_buffer.commit": lambda ev: session.commit(),
        "input_audio_buffer.clear": lambda ev: _clear(session),
        "conversation.item.create": session.on_item_create,
        "response.create": session.start_response,
        "response.cancel": lambda ev: _cancel(session),
    }
    try:
        while True:
            raw = await ws.receive_text()
            try:
                ev = json.loads(raw)
                if not isinstance(ev, dict):
                    raise ValueError("an event must be a JSON object")
            except ValueError as e:
                await session.error(f"not a JSON event: {e}", code="invalid_json")
                continue
            handler = handlers.get(ev.get("type"))
            if handler is None:
                await session.error(f"unsupported event type {ev.get('type')!r}", code="unsupported_event",
                                    event_id=ev.get("event_id"))
                continue
            try:
                await handler(ev)
            except ApiError as e:
                await session.error(e.message, code=e.code or e.type, param=e.param, event_id=ev.get("event_id"))
    except WebSocketDisconnect:
        pass
    finally:
        await session.cancel_response()


async def _clear(session: RealtimeSession) -> None:
    session.buffer = []
    await session.send({"type": "input_audio_buffer.cleared"})


async def _cancel(session: RealtimeSession) -> None:
    if not await session.cancel_response():
        raise ApiError(400, "there is no response in progress to cancel", code="response_cancel_not_active")

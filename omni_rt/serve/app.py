"""The FastAPI app: ``/health``, ``/v1/models``, ``/v1/chat/completions`` (JSON and SSE) and ``/v1/realtime``.

A thin layer over the public ``omni_rt.Runtime``, which runs in-process (its engine thread owns the device):
- requests stream through ``Runtime.astream``; a client that disconnects (or cancels) aborts its request, so its KV
  blocks are freed at the engine's next step;
- admission: at most ``max_inflight`` requests at once (running + queued); more get 429 with ``Retry-After``;
- ``/health`` is 503 while the checkpoint loads and after a device fault (``Runtime.stats()["fault"]``).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np

from .errors import ApiError
from .media import OUTPUT_RATE, encode_audio, pcm16_bytes
from .protocol import Limits, parse_chat

try:  # the [serve] extra
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('omni-rt serve needs the serve extra: pip install "omni_rt[serve]"') from e

AUDIO_EXPIRY_S = 3600


class ServerState:
    """What the routes share: the Runtime (None while loading), limits, accounting."""

    def __init__(self, load: Callable[[], Any], model_name: str, max_inflight: int, api_key: str | None,
                 limits: Limits, talker_max_new_tokens: int | None, realtime_options: dict | None = None):
        self._load = load
        self.model_name = model_name
        self.max_inflight = max_inflight
        self.api_key = api_key
        self.limits = limits
        self.talker_max_new_tokens = talker_max_new_tokens
        self.realtime_options = realtime_options or {}
        self.rt = None
        self.load_error: str | None = None
        self.inflight = 0
        self.lock = threading.Lock()
        self.loaded = threading.Event()

    def start_loading(self) -> None:
        def run():
            try:
                self.rt = self._load()
            except Exception as e:  # noqa: BLE001 - reported by /health and every route
                self.load_error = f"{type(e).__name__}: {e}"
            finally:
                self.loaded.set()
        threading.Thread(target=run, name="omni_rt-serve-load", daemon=True).start()

    def runtime(self):
        if self.rt is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise ApiError(503, msg, type="server_error", code="model_not_ready", headers={"Retry-After": "5"})
        fault = self.rt.stats()["fault"]
        if fault is not None:
            raise ApiError(503, f"the runtime hit a device fault and must be restarted: {fault}", code="device_fault")
        return self.rt

    def acquire(self) -> None:
        with self.lock:
            if self.inflight >= self.max_inflight:
                raise ApiError(429, f"the server is at its limit of {self.max_inflight} requests in flight; retry "
                               f"shortly", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.inflight += 1

    def release(self) -> None:
        with self.lock:
            self.inflight -= 1


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _runtime_error(e: BaseException) -> ApiError:
    """A Runtime exception as an API error: bad input is 400, a closed/faulted runtime 503, the rest 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (ValueError, TypeError, FileNotFoundError)):  # the runtime's argument errors name the field
        return ApiError(400, str(e))
    import omni_rt

    if isinstance(e, omni_rt.DeviceFault) or isinstance(e, RuntimeError) and "closed" in str(e):
        return ApiError(503, str(e), code="device_fault")
    return ApiError(500, f"{type(e).__name__}: {e}")


def _check_auth(state: ServerState, headers) -> None:
    if state.api_key is None:
        return
    auth = headers.get("authorization", "")
    if auth != f"Bearer {state.api_key}":
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


async def _read_json(request: Request, limit: int) -> Any:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                       code="payload_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                           code="payload_too_large")
    try:
        return json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(metrics: dict, completion_tokens: int, audio_frames: int | None) -> dict:
    prompt = int(metrics.get("prompt_tokens") or 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
             "total_tokens": prompt + completion_tokens}
    if audio_frames is not None:
        usage["completion_tokens_details"] = {"audio_tokens": int(audio_frames)}
    return usage


def _finish_reason(metrics: dict) -> str:
    return "length" if metrics.get("finish_reason") == "length" else "stop"


def create_app(load: Callable[[], Any], model_name: str = "omni_rt", max_inflight: int = 32,
               api_key: str | None = None, limits: Limits | None = None, talker_max_new_tokens: int | None = None,
               realtime_options: dict | None = None, load_in_background: bool = True,
               replica_name: str | None = None) -> FastAPI:
    """The app. ``load`` builds the Runtime (called once, in a thread, at startup: /health is 503 until it is
    done, or before the app starts with ``load_in_background=False``); a Runtime instance may be passed instead (then it
    is used as is and left open on shutdown). ``replica_name`` is sent back in an ``x-omni-rt-replica`` header."""
    owned = callable(load)   # a Runtime handed in is the caller's to close
    state = ServerState(load if owned else (lambda: load), model_name, max_inflight, api_key,
                        limits or Limits(), talker_max_new_tokens, realtime_options)

    async def lifespan(app):
        loop = asyncio.get_running_loop()
        # Runtime.astream waits on each request's queue in the default executor: one thread per stream in flight.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=max_inflight + 16,
                                                                        thread_name_prefix="omni_rt-serve"))
        state.start_loading()
        if not load_in_background:
            await loop.run_in_executor(None, state.loaded.wait)
        yield
        state.loaded.wait(timeout=600)
        if state.rt is not None and owned:
            state.rt.close()

    app = FastAPI(title="omni_rt", lifespan=lifespan)
    app.state.omni = state

    if replica_name is not None:   # which replica answered (Ray Serve: several processes behind one proxy)
        @app.middleware("http")
        async def _replica_header(request, call_next):
            response = await call_next(request)
            response.headers["x-omni-rt-replica"] = replica_name
            return response

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.get("/health")
    async def health():
        if state.rt is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        stats = state.rt.stats()
        ok = stats["fault"] is None
        return JSONResponse({"status": "ok" if ok else "fault", "stats": stats, "inflight": state.inflight},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(state, request.headers)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "omni_rt"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        _check_auth(state, request.headers)
        body = await _read_json(request, state.limits.max_body_bytes)
        rt = state.runtime()
        job = parse_chat(body, rt.speakers, state.model_name, state.limits, state.talker_max_new_tokens)
        state.acquire()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            agen = rt.astream(job.messages, speaker=job.speaker or "ethan", return_audio=job.return_audio,
                              thinker=job.thinker, talker=job.talker, request_id=rid)
        except BaseException:
            state.release()
            raise
        if job.stream:
            # The first chunk is awaited before the headers go out, so a request the Runtime refuses (bad audio, an
            # unknown voice, too long) is a 400 rather than an error event.
            try:
                first = await agen.__anext__()
            except BaseException as e:
                state.release()
                await agen.aclose()
                if isinstance(e, Exception):
                    return _error_response(_runtime_error(e))
                raise
            return StreamingResponse(_stream(state, rt, job, rid, agen, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _complete(request, rt, job, rid, agen)
        finally:
            state.release()

    from .realtime import realtime_endpoint

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await realtime_endpoint(ws, state)

    return app


async def _complete(request: Request, rt, job, rid: str, agen) -> Response:
    """Non-streaming: collect the reply; a client that goes away cancels the request."""
    async def collect():
        text, reasoning, ids, pcm, metrics = [], [], [], [], {}
        async for chunk in agen:
            text.append(chunk.text_delta)
            reasoning.append(chunk.reasoning_delta)
            ids.extend(chunk.token_ids)
            if chunk.audio.size:
                pcm.append(chunk.audio)
            if chunk.finished:
                metrics = chunk.metrics or {}
        return "".join(text), "".join(reasoning), ids, pcm, metrics

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                rt.abort(rid)
                return Response(status_code=499)
        text, reasoning, ids, pcm, metrics = task.result()
    except ApiError as e:
        return _error_response(e)
    except Exception as e:  # noqa: BLE001 - a failed request answers an error, never takes the server down
        return _error_response(_runtime_error(e))
    finally:
        if not task.done():
            task.cancel()
            rt.abort(rid)
    message: dict = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    frames = None
    if job.return_audio:
        wav = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
        frames = int(metrics.get("frames") or 0)
        message["audio"] = {"id": f"audio_{rid[9:]}", "data": base64.b64encode(encode_audio(wav, job.audio_format))
                            .decode(), "transcript": text, "expires_at": int(time.time()) + AUDIO_EXPIRY_S}
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": job.model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(metrics), "logprobs": None}],
        "usage": _usage(metrics, len(ids), frames),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
    })


async def _chain(first, agen):
    yield first
    async for c in agen:
        yield c


async def _stream(state: ServerState, rt, job, rid: str, agen, first):
    """SSE: a role chunk, then content / reasoning_content / audio deltas as the engine produces them (each audio
    delta = the PCM16 24 kHz samples of one engine chunk, sent when that chunk leaves the engine), a final chunk with
    finish_reason, usage when asked, and [DONE]."""
    created = int(time.time())
    audio_id = f"audio_{rid[9:]}"
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": job.model}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    finished = False
    ids = 0
    metrics: dict = {}
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for c in _chain(first, agen):
            ids += len(c.token_ids)
            if c.reasoning_delta:
                yield chunk({"reasoning_content": c.reasoning_delta})
            if c.text_delta:
                delta: dict = {"content": c.text_delta}
                if job.return_audio:
                    delta["audio"] = {"id": audio_id, "transcript": c.text_delta}
                yield chunk(delta)
            if c.audio.size:
                yield chunk({"audio": {"id": audio_id, "data": base64.b64encode(pcm16_bytes(c.audio)).decode()}})
            if c.finished:
                metrics = c.metrics or {}
                finished = True
        last: dict = {}
        if job.return_audio:
            last["audio"] = {"id": audio_id, "expires_at": created + AUDIO_EXPIRY_S}
        yield chunk(last, _finish_reason(metrics))
        if job.include_usage:
            yield _sse({**base, "choices": [],
                        "usage": _usage(metrics, ids, metrics.get("frames") if job.return_audio else None)})
        yield b"data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - after the headers went out, an error is an SSE event
        yield _sse(_runtime_error(e).body())
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            rt.abort(rid)   # the client left (or the request failed): free its KV now
        await agen.aclose()
        state.release()


def sample_rate() -> int:
    return OUTPUT_RATE

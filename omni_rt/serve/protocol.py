"""OpenAI chat-completions request → the Runtime's arguments (messages, speaker, SamplingParams), validated.

Sampling: ``temperature`` drives the thinker; ``temperature: 0`` makes the talker greedy too (otherwise it keeps
the reference's sampling defaults). ``seed`` seeds both stages (talker: seed + 1), so the whole reply — text and
speech — is reproducible, streamed or not. ``max_tokens``/``max_completion_tokens`` bound the thinker; the talker's
step budget is the server's ``--talker-max-new-tokens`` or the request's ``talker.max_new_tokens`` (extra field).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import omni_rt

from .errors import ApiError
from .media import OUTPUT_FORMATS, decode_audio, decode_image


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 64 << 20
    max_media_bytes: int = 48 << 20
    max_audio_seconds: float = 600.0
    allow_local_media: bool = True


@dataclasses.dataclass
class ChatJob:
    messages: list
    speaker: str
    return_audio: bool
    thinker: Any
    talker: Any
    stream: bool
    include_usage: bool
    audio_format: str
    model: str


def _num(body: dict, key: str, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", param=key)
    return v


def _messages(raw: Any, limits: Limits) -> list:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{p} must be an object", param=p)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{p}.role must be system, developer, user or assistant, got {role!r}",
                           param=f"{p}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = (m.get("audio") or {}).get("transcript", "") if isinstance(m.get("audio"), dict) else ""
        if isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{p}.content must be a string or an array of parts", param=f"{p}.content")
        parts = []
        for j, part in enumerate(content):
            pp = f"{p}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{pp}.text must be a string", param=f"{pp}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "input_audio":
                a = part.get("input_audio")
                if not isinstance(a, dict):
                    raise ApiError(400, f"{pp}.input_audio must be an object with data and format", param=pp)
                wav = decode_audio(a.get("data"), a.get("format", "wav"), f"{pp}.input_audio",
                                   limits.max_media_bytes, limits.max_audio_seconds)
                parts.append({"type": "audio", "audio": wav})
            elif kind == "image_url":
                u = part.get("image_url")
                url = u.get("url") if isinstance(u, dict) else u
                parts.append({"type": "image", "image": decode_image(url, f"{pp}.image_url.url",
                                                                      limits.max_media_bytes,
                                                                      limits.allow_local_media)})
            elif kind in ("video_url", "video"):
                u = part.get(kind)
                url = u.get("url") if isinstance(u, dict) else u
                if not isinstance(url, str) or url.startswith(("http://", "https://", "data:")):
                    raise ApiError(400, f"{pp}: video is accepted as a local file path only", param=pp)
                if not limits.allow_local_media:
                    raise ApiError(400, f"{pp}: local paths are disabled on this server", param=pp)
                parts.append({"type": "video", "video": url[7:] if url.startswith("file://") else url})
            else:
                raise ApiError(400, f"{pp}.type must be text, input_audio, image_url or video_url, got {kind!r}",
                               param=f"{pp}.type")
        out.append({"role": role, "content": parts})
    return out


def parse_chat(body: Any, speakers: list[str], model_name: str, limits: Limits,
               default_talker_steps: int | None) -> ChatJob:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", model_name)
    if model not in (model_name, None):
        raise ApiError(404, f"model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"} or "text" not in modalities:
        raise ApiError(400, f"modalities must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}",
                       param="modalities")
    want_audio = "audio" in modalities
    if want_audio and not speakers:
        raise ApiError(400, "this model has no talker: it answers with text only (modalities [\"text\"])",
                       param="modalities")
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise ApiError(400, "'audio' must be an object {voice, format}", param="audio")
    voice = str(audio.get("voice", speakers[0] if speakers else "")).lower()
    if want_audio and voice not in speakers:
        raise ApiError(400, f"audio.voice must be one of {speakers}, got {audio.get('voice')!r}", param="audio.voice")
    fmt = audio.get("format", "wav")
    if fmt not in OUTPUT_FORMATS:
        raise ApiError(400, f"audio.format must be one of {list(OUTPUT_FORMATS)}, got {fmt!r}", param="audio.format")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    so = body.get("stream_options") or {}
    include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False

    temperature = _num(body, "temperature", 0, 2)
    top_p = _num(body, "top_p", 1e-9, 1)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
    seed = _num(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or an array of up to 16 of them", param="stop")
    seed = None if seed is None else seed & ((1 << 63) - 1)
    thinker = omni_rt.SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed,
                                     stop=stop or None)
    talker = None
    if want_audio:
        extra = body.get("talker") or {}
        steps = extra.get("max_new_tokens", default_talker_steps) if isinstance(extra, dict) else None
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
            raise ApiError(400, f"talker.max_new_tokens must be an integer >= 2, got {steps!r}",
                           param="talker.max_new_tokens")
        talker = omni_rt.SamplingParams(temperature=0.0 if temperature == 0 else None, max_new_tokens=steps,
                                        seed=None if seed is None else (seed + 1) & ((1 << 63) - 1))
    return ChatJob(messages=_messages(body.get("messages"), limits), speaker=voice, return_audio=want_audio,
                   thinker=thinker, talker=talker, stream=stream, include_usage=include_usage, audio_format=fmt,
                   model=model_name)

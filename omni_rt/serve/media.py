"""Media in and out of the server: base64 audio in (wav/mp3/flac/pcm16), images from data: URLs or local paths
(never fetched from the network), and audio out (wav/pcm16/flac, 24 kHz). Size limits raise ``ApiError`` 413."""
from __future__ import annotations

import base64
import binascii
import io
import os
import wave

import numpy as np

from omni_rt import audio as audio_mod

from .errors import ApiError

OUTPUT_RATE = 24000
INPUT_FORMATS = ("wav", "mp3", "flac", "pcm16")
OUTPUT_FORMATS = ("wav", "pcm16", "flac")


def b64decode(data: str, param: str, max_bytes: int) -> bytes:
    if not isinstance(data, str):
        raise ApiError(400, f"{param} must be a base64 string", param=param)
    if len(data) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{param} is larger than the server's limit of {max_bytes} bytes", param=param,
                       type="invalid_request_error", code="payload_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param} is not valid base64: {e}", param=param) from None


def decode_audio(data: str, fmt: str, param: str, max_bytes: int, max_seconds: float,
                 pcm_rate: int = OUTPUT_RATE) -> np.ndarray:
    """Base64 audio → float32 mono 16 kHz. ``pcm16`` is raw little-endian 16-bit mono at ``pcm_rate`` (24 kHz, as
    the OpenAI API defines it)."""
    if fmt not in INPUT_FORMATS:
        raise ApiError(400, f"{param}.format must be one of {list(INPUT_FORMATS)}, got {fmt!r}", param=f"{param}.format")
    raw = b64decode(data, f"{param}.data", max_bytes)
    if not raw:
        raise ApiError(400, f"{param}.data is empty", param=f"{param}.data")
    try:
        if fmt == "pcm16":
            if len(raw) % 2:
                raise ValueError("pcm16 data has an odd number of bytes")
            seconds = len(raw) / 2 / pcm_rate
            if seconds > max_seconds:
                raise _too_long(param, seconds, max_seconds)
            return audio_mod.load(np.frombuffer(raw, dtype="<i2"), sr=pcm_rate)
        wav = audio_mod.load(io.BytesIO(raw))
    except ApiError:
        raise
    except (ValueError, ImportError, RuntimeError) as e:
        raise ApiError(400, f"{param}: cannot decode {fmt} audio: {e}", param=param) from None
    if wav.size / audio_mod.SAMPLE_RATE > max_seconds:
        raise _too_long(param, wav.size / audio_mod.SAMPLE_RATE, max_seconds)
    return wav


def _too_long(param: str, seconds: float, limit: float) -> ApiError:
    return ApiError(413, f"{param} is {seconds:.1f} s long; the server accepts at most {limit:g} s", param=param,
                    code="payload_too_large")


def decode_image(url: str, param: str, max_bytes: int, allow_local: bool):
    """An ``image_url``: a data: URL (decoded to an RGB array) or, when allowed, a local file path. Never fetched."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{param} must be a non-empty string", param=param)
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ApiError(400, f"{param}: only base64 data: URLs are accepted", param=param)
        raw = b64decode(payload, param, max_bytes)
        try:
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > 64_000_000:
                    raise ApiError(413, f"{param}: image of {im.width}x{im.height} pixels is too large", param=param)
                return np.asarray(im.convert("RGB"))
        except ApiError:
            raise
        except ImportError:
            raise ApiError(400, "images need Pillow (pip install pillow)", param=param) from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad input
            raise ApiError(400, f"{param}: cannot decode the image: {e}", param=param) from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{param}: the server does not fetch URLs; send a base64 data: URL", param=param)
    path = url[len("file://"):] if url.startswith("file://") else url
    if not allow_local:
        raise ApiError(400, f"{param}: local paths are disabled on this server (--allow-local-media)", param=param)
    if not os.path.isfile(path):
        raise ApiError(400, f"{param}: no such file {path!r}", param=param)
    if os.path.getsize(path) > max_bytes:
        raise ApiError(413, f"{param}: file is larger than {max_bytes} bytes", param=param)
    return path


def pcm16_bytes(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def encode_audio(pcm: np.ndarray, fmt: str) -> bytes:
    """float32 mono 24 kHz → bytes in ``fmt`` (wav: 16-bit PCM RIFF; pcm16: raw little-endian; flac)."""
    if fmt == "pcm16":
        return pcm16_bytes(pcm)
    if fmt == "wav":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(OUTPUT_RATE)
            w.writeframes(pcm16_bytes(pcm))
        return buf.getvalue()
    if fmt == "flac":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.clip(pcm, -1, 1), OUTPUT_RATE, format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    raise ValueError(f"audio format must be one of {OUTPUT_FORMATS}, got {fmt!r}")

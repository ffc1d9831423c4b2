"""Request-side value types of the public API: Prompt, SamplingParams, GenerationOutput, StreamChunk."""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Sequence

import numpy as np

# The reference's defaults per stage (transformers Qwen3OmniMoe generate()): the thinker decodes greedily;
# the talker samples with top_k 50, top_p 1.0, temperature 0.9 and repetition penalty 1.05.
_STAGE_DEFAULTS = {
    "thinker": dict(temperature=0.0, top_k=50, top_p=1.0, repetition_penalty=1.0, max_new_tokens=1024),
    "talker": dict(temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05, max_new_tokens=4096),
}


@dataclasses.dataclass
class SamplingParams:
    """Sampling settings for one stage; None fields take that stage's reference default.

    temperature 0 = greedy (repetition penalty still applies, as in transformers). stop_token_ids None = the
    stage's own stop id (<|im_end|> for the thinker, codec_eos for the talker). seed None = a random seed.
    stop (thinker): strings; the reply's text ends before the first one and nothing past it is spoken.
    Talker max_new_tokens counts talker steps: T steps give T - 1 frames.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None   # strings: the reply ends before the first one (thinker only)

    def resolved(self, stage: str) -> "SamplingParams":
        """A copy with every None filled from ``stage``'s defaults, validated."""
        if stage not in _STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(_STAGE_DEFAULTS)}, got {stage!r}")
        values = dataclasses.asdict(self)
        for key, default in _STAGE_DEFAULTS[stage].items():
            if values[key] is None:
                values[key] = default
        out = SamplingParams(**values)
        out.validate()
        return out

    def validate(self) -> None:
        if self.temperature is not None and not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, (int, np.integer))
                                                or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.stop_token_ids is not None and not all(isinstance(t, (int, np.integer)) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids}")
        if self.stop is not None:
            if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")


@dataclasses.dataclass
class Prompt:
    """A pre-tokenized prompt: token ids exactly as the HF processor makes them and the media in order of
    appearance.

    Each audio's <|audio_pad|> run, image's <|image_pad|> run and video's <|video_pad|> run is already expanded to
    its token count (``grid_t·grid_h·grid_w // 4`` for vision); with ``use_audio_in_video`` each video's block is
    ``<|vision_start|><|audio_start|>`` + its video and audio pads interleaved by time as Qwen3OmniMoeProcessor does
    + ``<|audio_end|><|vision_end|>``, and that video's audio is in ``audios`` at its place in order of appearance.

    audios: float32 mono 16 kHz arrays or paths. images: uint8 (H, W, 3) arrays, PIL images or paths. videos:
    uint8 (T, H, W, 3) arrays of frames already sampled, with ``video_fps`` (one per video; default 2.0 each).
    """

    token_ids: Sequence[int]
    audios: Sequence[Any] = ()
    images: Sequence[Any] = ()
    videos: Sequence[Any] = ()
    video_fps: Sequence[float] | None = None
    use_audio_in_video: bool = False

    def __post_init__(self):
        ids = list(self.token_ids)
        if not ids:
            raise ValueError("Prompt.token_ids is empty")
        if not all(isinstance(t, (int, np.integer)) and t >= 0 for t in ids):
            raise ValueError("Prompt.token_ids must be non-negative integers")
        self.token_ids = [int(t) for t in ids]
        self.audios = list(self.audios)
        self.images = list(self.images)
        self.videos = list(self.videos)
        fps = [2.0] * len(self.videos) if self.video_fps is None else list(self.video_fps)
        if len(fps) != len(self.videos):
            raise ValueError(f"Prompt.video_fps has {len(fps)} values for {len(self.videos)} videos")
        for i, f in enumerate(fps):
            if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not (
                    np.isfinite(f) and f > 0):
                raise ValueError(f"Prompt.video_fps[{i}] must be a finite number > 0, got {f!r}")
        self.video_fps = [float(f) for f in fps]
        if not isinstance(self.use_audio_in_video, (bool, np.bool_)):
            raise ValueError(f"Prompt.use_audio_in_video must be a bool, got {self.use_audio_in_video!r}")
        self.use_audio_in_video = bool(self.use_audio_in_video)


@dataclasses.dataclass
class GenerationOutput:
    request_id: str
    text: str
    token_ids: list[int]
    codes: np.ndarray | None = None
    audio: np.ndarray | None = None
    sample_rate: int = 24000
    metrics: dict = dataclasses.field(default_factory=dict)
    finish_reason: str = "stop"
    reasoning: str = ""          # a Thinking checkpoint's <think>…</think> span (not part of ``text``)


@dataclasses.dataclass
class StreamChunk:
    request_id: str
    text_delta: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    audio: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    finished: bool = False
    metrics: dict | None = None
    error: BaseException | None = None
    reasoning_delta: str = ""    # new reasoning text (Thinking checkpoints), apart from text_delta


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]

"""Request-side value types of the public API: Prompt, SamplingParams, GenerationOutput, StreamChunk."""
from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any, Sequence

import numpy as np

from .validate import check_bool, check_int, check_int_list, check_real

# Seeds are 63-bit: the sampler keeps them in int64 tensors.
SEED_LIMIT = 1 << 63

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

    def __post_init__(self):
        self.validate()

    def resolved(self, stage: str) -> "SamplingParams":
        """A copy with every None filled from ``stage``'s defaults, validated."""
        if stage not in _STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(_STAGE_DEFAULTS)}, got {stage!r}")
        self.validate()  # the fields may have been assigned since construction
        values = dataclasses.asdict(self)
        for key, default in _STAGE_DEFAULTS[stage].items():
            if values[key] is None:
                values[key] = default
        return SamplingParams(**values)

    def for_vocab(self, vocab_size: int, name: str = "SamplingParams") -> "SamplingParams":
        """A copy checked against a stage's vocabulary: every stop id must lie in it, and a ``top_k`` of at least
        the vocabulary size means "no top-k" (0), as transformers' TopKLogitsWarper treats it."""
        if self.stop_token_ids is not None:
            check_int_list(f"{name}.stop_token_ids", self.stop_token_ids, 0, vocab_size)
        top_k = self.top_k
        if top_k is not None and top_k >= vocab_size:
            top_k = 0
        return dataclasses.replace(self, top_k=top_k)

    def validate(self) -> None:
        """Check (and normalise to Python scalars) every field that is set: TypeError for a wrong type,
        ValueError for a value out of range, naming the field and what it accepts."""
        if self.temperature is not None:
            self.temperature = check_real("SamplingParams.temperature", self.temperature, 0.0,
                                          hint=" (0 = greedy)")
        if self.top_k is not None:
            self.top_k = check_int("SamplingParams.top_k", self.top_k, 0, hint=" (0 = no top-k)")
        if self.top_p is not None:
            self.top_p = check_real("SamplingParams.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.repetition_penalty is not None:
            self.repetition_penalty = check_real("SamplingParams.repetition_penalty", self.repetition_penalty,
                                                 0.0, lo_open=True, hint=" (1 = off)")
        if self.max_new_tokens is not None:
            self.max_new_tokens = check_int("SamplingParams.max_new_tokens", self.max_new_tokens, 1)
        if self.stop_token_ids is not None:
            self.stop_token_ids = check_int_list("SamplingParams.stop_token_ids", self.stop_token_ids, 0)
        if self.seed is not None:
            self.seed = check_int("SamplingParams.seed", self.seed, 0, SEED_LIMIT, hi_exclusive=True)
        if self.stop is not None:
            if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, (list, tuple)):
                raise TypeError(f"SamplingParams.stop must be a list of non-empty strings, got "
                                f"{type(self.stop).__name__} {self.stop!r:.80}")
            for i, x in enumerate(self.stop):
                if not isinstance(x, str):
                    raise TypeError(f"SamplingParams.stop[{i}] must be a string, got {type(x).__name__}")
                if not x:
                    raise ValueError(f"SamplingParams.stop[{i}] must be a non-empty string")
            self.stop = list(self.stop)


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
        self.token_ids = check_int_list("Prompt.token_ids", self.token_ids, 0)
        if not self.token_ids:
            raise ValueError("Prompt.token_ids is empty: a prompt needs at least one token id")
        if isinstance(self.audios, (str, os.PathLike, np.ndarray)) or not isinstance(self.audios, (list, tuple)):
            raise TypeError(f"Prompt.audios must be a list of audios (np.ndarray, torch.Tensor or path), got "
                            f"{type(self.audios).__name__}")
        self.audios = list(self.audios)
        for i, a in enumerate(self.audios):
            check_media(f"Prompt.audios[{i}]", a)
        for name in ("images", "videos"):
            items = getattr(self, name)
            if isinstance(items, (str, os.PathLike, np.ndarray)) or not isinstance(items, (list, tuple)):
                raise TypeError(f"Prompt.{name} must be a list, got {type(items).__name__}")
            setattr(self, name, list(items))
            for i, item in enumerate(getattr(self, name)):
                if isinstance(item, (str, os.PathLike)) and not os.path.exists(os.fspath(item)):
                    raise FileNotFoundError(f"Prompt.{name}[{i}]: file not found: {os.fspath(item)!r}")
        if self.video_fps is not None and (isinstance(self.video_fps, (str, bytes))
                                           or not isinstance(self.video_fps, (list, tuple, np.ndarray))):
            raise TypeError(f"Prompt.video_fps must be a list of numbers or None, got {type(self.video_fps).__name__}")
        fps = [2.0] * len(self.videos) if self.video_fps is None else list(self.video_fps)
        if len(fps) != len(self.videos):
            raise ValueError(f"Prompt.video_fps has {len(fps)} values for {len(self.videos)} videos")
        self.video_fps = [check_real(f"Prompt.video_fps[{i}]", f, 0.0, lo_open=True) for i, f in enumerate(fps)]
        self.use_audio_in_video = check_bool("Prompt.use_audio_in_video", self.use_audio_in_video)


def check_media(name: str, value: Any) -> None:
    """An audio given as an array, a tensor or a path; a path must exist (FileNotFoundError otherwise)."""
    import torch

    if isinstance(value, (np.ndarray, torch.Tensor)):
        return
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: audio file not found: {path!r}")
        return
    raise TypeError(f"{name} must be an np.ndarray or torch.Tensor of samples, or a path to an audio file; got "
                    f"{type(value).__name__}")


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

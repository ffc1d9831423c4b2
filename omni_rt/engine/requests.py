"""Engine-side request state: what one request holds while it runs, and its output channel."""
from __future__ import annotations

import dataclasses
import enum
import queue
import time
from typing import Any

import numpy as np
import torch

from ..request import SamplingParams, StreamChunk
from ..tokenizer import IncrementalDetokenizer
from .text_output import TextOutput


class OutputChannel(queue.Queue):
    """A request's chunk queue. ``waker`` (if set) is called after every put, on the putting thread, so an
    event loop can await chunks without parking an executor thread on ``get()`` (see omni_rt.streams)."""

    waker = None

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        waker = self.waker
        if waker is not None:
            waker()


class Phase(enum.Enum):
    WAITING = "waiting"        # queued, no resources yet
    PREFILL = "prefill"        # thinker prompt being prefilled (possibly over several steps)
    DECODE = "decode"          # thinker generating
    DONE = "done"              # thinker finished (the talker may still be speaking)


@dataclasses.dataclass
class EngineRequest:
    request_id: str
    prompt: list[int]
    audios: list[np.ndarray]
    thinker_params: SamplingParams       # resolved
    talker_params: SamplingParams | None  # resolved; None = text only
    speaker_id: int | None
    thinker_stop_ids: frozenset
    thinker_seed: int
    talker_seed: int
    detok: IncrementalDetokenizer
    text_out: "TextOutput | None" = None   # text/reasoning deltas and stop strings (None: plain detok)
    out: OutputChannel = dataclasses.field(default_factory=OutputChannel)
    seq_id: int = -1
    phase: Phase = Phase.WAITING
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prefilled: int = 0
    reserved_blocks: int = 0
    # Thinker tensors the talker consumes: prompt embeddings and accept-layer hidden states, and the
    # embeddings of generated tokens (kept only when speaking).
    embeds: torch.Tensor | None = None           # (prompt_len, H) after the audio scatter
    prompt_taps: list[torch.Tensor] = dataclasses.field(default_factory=list)
    positions: torch.Tensor | None = None
    audio_embeds: torch.Tensor | None = None
    vision: list = dataclasses.field(default_factory=list)   # prompting.VisionInput, in order of appearance
    rope_delta: float = 0.0                      # decode token k sits at position k + rope_delta (TM-RoPE)
    deepstack: Any = None                        # (visual mask (prompt_len,), [features (n_visual, H)] per tap)
    speech: Any = None                           # the speech stage's per-request state
    cancelled: bool = False
    error: BaseException | None = None
    # metrics (perf_counter seconds)
    t_submit: float = dataclasses.field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_first_audio: float | None = None
    t_thinker_done: float | None = None
    audio_samples: int = 0
    frames: int = 0
    codes: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def speaking(self) -> bool:
        return self.talker_params is not None

    @property
    def thinker_finished(self) -> bool:
        return self.finish_reason is not None

    def stop_here(self, reason: str = "stop") -> None:
        """End the thinker at the token just pushed (a stop string was found in the text)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.t_thinker_done = time.perf_counter()

    def push_token(self, token: int) -> None:
        self.output.append(token)
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
        if token in self.thinker_stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.thinker_params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.t_thinker_done = time.perf_counter()

    def metrics(self, sample_rate: int = 24000) -> dict:
        now = time.perf_counter()
        ms = lambda t: None if t is None else (t - self.t_submit) * 1000.0  # noqa: E731
        done = self.t_thinker_done or now
        decode_s = max(done - (self.t_first_token or done), 1e-9)
        audio_s = self.audio_samples / sample_rate
        total = now - self.t_submit
        return {
            "first_packet_ms": ms(self.t_first_audio),
            "prompt_tokens": len(self.prompt),
            "finish_reason": self.finish_reason,
            "thinker_ttft_ms": ms(self.t_first_token),
            "thinker_tokens": len(self.output),
            "thinker_tokens_per_s": (len(self.output) - 1) / decode_s if len(self.output) > 1 else None,
            "frames": self.frames,
            "frames_per_s": self.frames / total if self.frames else None,
            "audio_s": audio_s,
            "rtf": total / audio_s if audio_s > 0 else None,
            "total_ms": total * 1000.0,
        }

"""One ``Sequence`` per decoder stream (thinker or talker) and the ``Request`` that holds them.

A Sequence is what the scheduler and the runners need to know about a stream: its prompt (embeddings and
float32 (3, T) M-RoPE positions, dropped once prefilled), its generated ids, its sampling parameters and seed,
the stop/length rule, its KV sequence id and the KV blocks reserved for its whole length. A Request is one
thinker Sequence, an optional talker Sequence (speech), a speech slot (Code2Wav state and the talker's frame
state live in slot-indexed device pools), its output channel and its metrics — nothing else per request.
"""
from __future__ import annotations

import dataclasses
import queue
import time
from typing import Any

import numpy as np
import torch

from ..request import SamplingParams, StreamChunk


class OutputChannel(queue.Queue):
    """A request's chunk queue. ``waker`` (if set) is called after every put, on the putting thread, so an
    event loop can await chunks without parking an executor thread on ``get()`` (see omni_rt.streams)."""

    waker = None

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        waker = self.waker
        if waker is not None:
            waker()


class Sequence:
    """One decoder stream.

    seq_id: KV sequence id in its pool; params: resolved SamplingParams; stop_ids: ids that end it; seed: the
    sampler's counter-based seed; prompt_ids: the thinker's prompt ids ([] for the talker, whose prompt is
    embeddings only). ``embeds`` (n, H) and ``positions`` (3, n) float32 are set when the prompt is known.
    ``rope_delta``: offset of decode positions past the prompt length (0 for text/audio; TM-RoPE sets it).
    ``feed``: talker streams only — their input recipe (``models.talker.TalkerTextFeed``), built at the
    thinker's first token; it yields the talker's prompt and one text entry per decoded code.
    """

    def __init__(self, seq_id: int, params: SamplingParams, stop_ids, seed: int, prompt_ids=()):
        self.seq_id = seq_id
        self.params = params
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.seed = int(seed)
        self.prompt_ids: list[int] = list(prompt_ids)
        self.prompt_len = len(self.prompt_ids)
        self.embeds: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.rope_delta = 0.0
        self.prefilled = 0
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.reserved_blocks = 0
        self.feed = None

    def set_prompt(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """embeds: (n, H); positions: (3, n) float32."""
        self.embeds, self.positions = embeds, positions.to(torch.float32)
        self.prompt_len = embeds.shape[0]

    @property
    def prefill_left(self) -> int:
        return self.prompt_len - self.prefilled if self.embeds is not None else 0

    def chunk(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n prompt tokens: (embeds (n, H), positions (3, n))."""
        a = self.prefilled
        return self.embeds[a: a + n], self.positions[:, a: a + n]

    def next_position(self) -> float:
        """M-RoPE position of the newest output token (the next decode step's input), equal on t/h/w."""
        return self.prompt_len + len(self.output) - 1 + self.rope_delta

    @property
    def started(self) -> bool:
        return bool(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Append a generated id and apply the stop/length rule."""
        self.output.append(int(token))
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def needed_tokens(self, extra: int = 0) -> int:
        """KV tokens this stream can ever hold: prompt (+ extra positions) + max_new_tokens."""
        return self.prompt_len + extra + self.params.max_new_tokens


@dataclasses.dataclass
class Request:
    """One request in the engine. ``talker`` is None for text-only requests (its ``feed`` is the talker's
    input recipe)."""

    request_id: str
    thinker: Sequence
    audios: list
    detok: Any
    text_out: Any = None                                        # text_output.TextOutput (None: plain detok)
    talker: Sequence | None = None
    speaker_id: int | None = None
    slot: int = -1
    taps: list = dataclasses.field(default_factory=list)        # accept-layer hidden states of prompt chunks
    held: list = dataclasses.field(default_factory=list)        # (G,) int64 host frames not yet vocoded
    codes: list = dataclasses.field(default_factory=list)       # (G, n) int64 host frames vocoded
    vocoded: int = 0
    out: OutputChannel = dataclasses.field(default_factory=OutputChannel)
    vision: list = dataclasses.field(default_factory=list)       # prompting.VisionInput, in order of appearance
    deepstack: Any = None   # (visual mask (prompt_len,), [features (n_visual, H)] per tap) while prefilling
    cancelled: bool = False
    error: BaseException | None = None
    t_submit: float = dataclasses.field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_first_audio: float | None = None
    t_thinker_done: float | None = None
    audio_samples: int = 0

    @property
    def speaking(self) -> bool:
        return self.talker is not None

    @property
    def finish_reason(self) -> str | None:
        return self.thinker.finish_reason

    @property
    def output(self) -> list[int]:
        return self.thinker.output

    @property
    def done(self) -> bool:
        """Both stages are over and every frame is vocoded."""
        if not self.thinker.finished:
            return False
        return not self.speaking or (self.talker.finished and not self.held)

    def metrics(self, sample_rate: int = 24000) -> dict:
        now = time.perf_counter()
        ms = lambda t: None if t is None else (t - self.t_submit) * 1000.0  # noqa: E731
        done = self.t_thinker_done or now
        decode_s = max(done - (self.t_first_token or done), 1e-9)
        audio_s = self.audio_samples / sample_rate
        total = now - self.t_submit
        n, frames = len(self.output), self.vocoded
        return {
            "first_packet_ms": ms(self.t_first_audio),
            "prompt_tokens": self.thinker.prompt_len,
            "finish_reason": self.finish_reason,
            "thinker_ttft_ms": ms(self.t_first_token),
            "thinker_tokens": n,
            "thinker_tokens_per_s": (n - 1) / decode_s if n > 1 else None,
            "frames": frames,
            "frames_per_s": frames / total if frames else None,
            "audio_s": audio_s,
            "rtf": total / audio_s if audio_s > 0 else None,
            "total_ms": total * 1000.0,
        }

    def all_codes(self, groups: int) -> np.ndarray:
        return np.concatenate(self.codes, axis=1) if self.codes else np.zeros((groups, 0), dtype=np.int64)

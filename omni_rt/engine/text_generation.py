"""Batched thinker text generation: one varlen prefill for all prompts, then batched decode steps.

Each sequence stops on its own stop ids or max_new_tokens; finished sequences leave the batch and return
their KV blocks at once. Greedy results are identical to generating each prompt alone.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import torch

from ..models.thinker import Thinker
from ..request import SamplingParams
from .model_runner import DecoderRunner, text_positions
from .sampler import SamplingTensors, sample


@dataclasses.dataclass
class TextSequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams          # resolved
    stop_ids: frozenset
    seed: int
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        self.output.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_new_tokens:
            self.finish_reason = "length"


def _seen_mask(seqs: Sequence[TextSequence], vocab: int, device) -> torch.Tensor | None:
    """(B, vocab) bool of ids in each prompt + output, only when some row has a repetition penalty."""
    if all(s.params.repetition_penalty == 1.0 for s in seqs):
        return None
    seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        seen[i, torch.tensor(s.prompt + s.output, dtype=torch.long, device=device)] = True
    return seen


def _sample(model: Thinker, hidden: torch.Tensor, seqs: Sequence[TextSequence]) -> list[int]:
    logits = model.logits(hidden)
    st = SamplingTensors.build([s.params for s in seqs], [len(s.output) for s in seqs], [s.seed for s in seqs],
                               hidden.device)
    ids = sample(logits, st, _seen_mask(seqs, logits.shape[-1], hidden.device))
    return ids.tolist()


@torch.inference_mode()
def generate_text(model: Thinker, runner: DecoderRunner, prompts: Sequence[Sequence[int]],
                  params: Sequence[SamplingParams], audio_embeds: Sequence[torch.Tensor | None] | None = None,
                  default_stop_ids: Sequence[int] = (), first_seq_id: int = 0) -> list[TextSequence]:
    """Generate for every prompt; returns the sequences with ``output`` and ``finish_reason``.

    prompts: token ids (audio pads expanded); audio_embeds[i]: (n_audio_tokens_i, H) or None.
    """
    device = model.lm_head.weight.device
    audio_embeds = list(audio_embeds) if audio_embeds is not None else [None] * len(prompts)
    seqs = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        stop = frozenset(p.stop_token_ids if p.stop_token_ids is not None else default_stop_ids)
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        seqs.append(TextSequence(first_seq_id + i, list(prompt), p, stop, seed))
    try:
        embeds = [model.embed(torch.tensor(s.prompt, device=device), a) for s, a in zip(seqs, audio_embeds)]
        positions = [text_positions(0, len(s.prompt), device) for s in seqs]
        hidden, _ = runner.prefill([s.seq_id for s in seqs], embeds, positions)
        last = torch.stack([h[-1] for h in hidden])
        for s, tok in zip(seqs, _sample(model, last, seqs)):
            s.push(tok)
        while True:
            active = [s for s in seqs if not s.finished]
            for s in seqs:
                if s.finished:
                    runner.free(s.seq_id)
            if not active:
                break
            ids = torch.tensor([s.output[-1] for s in active], device=device)
            pos = torch.tensor([len(s.prompt) + len(s.output) - 1 for s in active], device=device)
            hidden, _ = runner.decode([s.seq_id for s in active], model.embed(ids), pos.expand(3, -1))
            for s, tok in zip(active, _sample(model, hidden, active)):
                s.push(tok)
    finally:
        for s in seqs:
            runner.free(s.seq_id)
    return seqs

"""Batched, graph-safe sampling: repetition penalty, temperature, top-k, top-p, per-request seeds.

Processing follows transformers' generate(): repetition penalty over every id seen so far (prompt included),
suppressed ids set to -inf, then — for sampling rows only — temperature, top-k, top-p, and a draw from the
softmax. Greedy rows (temperature 0) take the argmax of the penalised scores, as transformers does with
do_sample=False. Every row has its own parameters, so requests with different settings batch together.

The sampled rows never sort the vocabulary twice: the scores' top ``CANDIDATES`` (``torch.topk``, sorted) — or,
when some sampled row has top_k 0 or above the cap, the whole vocabulary sorted once, so results never change
silently — go through ONE kernel (``kernels.sorted_sample``) that applies temperature, top-k, top-p, draws, and
takes the greedy rows' argmax (the first id at the maximum, from the candidates). Which of the two is a host
decision (``SamplingTensors.within_cap``, known from the request parameters), never a device read. A thinker step
is then: one penalty launch (``kernels.logits_process``), topk, one draw launch — instead of ≈30 ATen ops. An
all-greedy batch known on the host is one argmax.

Randomness is counter-based: the draw for (seed, step) is a Gumbel-max over a hash of (seed, step, token id)
(``kernels.counter_uniform``'s hash, taken in float32). No host sync, no generator state, same result at any
batch composition — so a request's sampled output does not depend on what it was batched with, and the step
can be captured in a graph. No float64 anywhere.
"""
from __future__ import annotations

import dataclasses

import torch

# counter_uniform(seeds, steps, n) -> (batch, n): U(0, 1) as a pure function of (seed, step, column); the hash the
# sampler's noise is drawn from (re-exported; sorted_sample evaluates it at the candidates' token ids).
from .kernels.counter_uniform import counter_uniform  # noqa: F401
from .kernels.logits_process import logits_process
from .kernels.sorted_sample import sorted_sample

# The candidate set of the sampled rows: rows with 1 <= top_k <= CANDIDATES draw from the scores' top CANDIDATES
# (the defaults: thinker and talker top_k 50, the code predictor 50). 256 keeps the topk and the one-tile kernel
# cheap while leaving room for user top_k values several times the defaults; larger top_k (or 0) sorts all.
CANDIDATES = 256


def params_within_cap(params) -> bool:
    """Whether every sampled row of ``params`` (objects with temperature/top_k) has 1 <= top_k <= CANDIDATES."""
    return all(p.temperature == 0 or 0 < (p.top_k or 0) <= CANDIDATES for p in params)


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (list / numpy) → a device tensor without blocking the host: staged through pinned memory
    and copied with ``non_blocking=True`` on CUDA (a pageable copy would wait for the device); plain on CPU."""
    host = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device) if device is not None else host.device
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: torch.Tensor        # (batch,) float32
    top_k: torch.Tensor              # (batch,) int64
    top_p: torch.Tensor              # (batch,) float32
    repetition_penalty: torch.Tensor | None  # (batch,) float32; None: no penalty (``seen`` must be None then)
    seeds: torch.Tensor              # (batch,) int64
    steps: torch.Tensor              # (batch,) int64
    # Host-side knowledge that every row is greedy: lets eager calls skip the warping and noise entirely.
    # None (unknown, e.g. inside a captured graph) always takes the full branch-free path.
    all_greedy: bool | None = None
    # Host-side knowledge that every sampled row has 1 <= top_k <= CANDIDATES (``params_within_cap``): the draw then
    # runs over the top CANDIDATES only. None/False (unknown, or some row needs it) sorts the whole vocabulary.
    within_cap: bool | None = None
    # Added to ``steps`` inside the draw kernel (a python int: the code predictor's in-frame code index j, so
    # its 15 draws per frame share one steps tensor and launch no index arithmetic).
    step_offset: int = 0

    @classmethod
    def build(cls, params: list, steps: list[int], seeds: list[int], device) -> "SamplingTensors":
        """params: objects with temperature/top_k/top_p/repetition_penalty attributes (SamplingParams)."""
        f32, i64 = torch.float32, torch.int64
        return cls(
            temperature=to_device([p.temperature for p in params], f32, device),
            top_k=to_device([p.top_k or 0 for p in params], i64, device),
            top_p=to_device([p.top_p for p in params], f32, device),
            repetition_penalty=to_device([p.repetition_penalty for p in params], f32, device),
            seeds=to_device(list(seeds), i64, device),
            steps=to_device(list(steps), i64, device),
            all_greedy=all(p.temperature == 0 for p in params),
            within_cap=params_within_cap(params),
        )


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """scores: (batch, vocab) fp32; seen: (batch, vocab) bool — ids in the prompt or generated so far.

    transformers: score < 0 → score · penalty, else score / penalty, for each seen id.
    """
    return logits_process(scores, seen, penalty)


def process_scores(logits: torch.Tensor, seen: torch.Tensor | None, penalty: torch.Tensor | None,
                   suppress: torch.Tensor | None) -> torch.Tensor:
    """logits (batch, vocab) any float dtype → scores after the repetition penalty and the suppressed ids: fp32
    from one ``logits_process`` launch, or with neither the logits themselves (argmax, topk and the draw kernel
    read any float dtype, and a float cast is exact and monotone: the same ids, no cast launched)."""
    if seen is None and suppress is None:
        return logits
    return logits_process(logits, seen, penalty, suppress)


def sample(logits: torch.Tensor, st: SamplingTensors, seen: torch.Tensor | None = None,
           suppress: torch.Tensor | None = None) -> torch.Tensor:
    """logits: (batch, vocab) any float dtype → next ids (batch,) int64.

    seen: (batch, vocab) bool for the repetition penalty; suppress: (vocab,) bool ids that may never be chosen.

    Greedy rows: the argmax of the processed scores (first index among ties, as transformers). Sampled rows:
    ``CANDIDATES`` candidates from ``torch.topk`` when ``st.within_cap`` says every sampled row has
    1 <= top_k <= CANDIDATES (host knowledge), else the whole vocabulary sorted once — either way followed by
    one ``sorted_sample`` launch (temperature, top-k, top-p, counter-based Gumbel-max draw, and the greedy rows'
    argmax). ``st.all_greedy`` (host knowledge): one argmax.
    """
    scores = process_scores(logits, seen, st.repetition_penalty, suppress)
    if st.all_greedy:
        return scores.argmax(dim=-1)
    vocab = scores.shape[-1]
    if st.within_cap and vocab > CANDIDATES:
        vals, idx = scores.topk(CANDIDATES, dim=-1, largest=True, sorted=True)
    else:   # exact for any top_k / top_p: every token is a candidate
        vals, idx = scores.sort(dim=-1, descending=True)
    return sorted_sample(vals, idx, scores, st.temperature, st.top_k, st.top_p, st.seeds, st.steps,
                         st.step_offset)

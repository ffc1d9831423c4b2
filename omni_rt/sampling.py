"""Batched, graph-safe sampling: repetition penalty, temperature, top-k, top-p, per-request seeds.

Processing follows transformers' generate(): repetition penalty over every id seen so far (prompt included),
suppressed ids set to -inf, then — for sampling rows only — temperature, top-k, top-p, and a draw from the
softmax. Greedy rows (temperature 0) take the argmax of the penalised scores, as transformers does with
do_sample=False. Every row has its own parameters, so requests with different settings batch together.

Randomness is counter-based: the draw for (seed, step) is a Gumbel-max over a hash of (seed, step, token id),
computed with int64 tensor ops. No host sync, no generator state, same result at any batch composition — so a
request's sampled output does not depend on what it was batched with, and the step can be captured in a graph.
"""
from __future__ import annotations

import dataclasses

import torch

# counter_uniform(seeds, steps, n) -> (batch, n) float64: U(0, 1) as a pure function of (seed, step, column);
# one Triton launch on CUDA, the same integer hash in torch ops elsewhere (bit-identical).
from .kernels.counter_uniform import counter_uniform  # noqa: F401  (used below, re-exported)


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
    repetition_penalty: torch.Tensor  # (batch,) float32
    seeds: torch.Tensor              # (batch,) int64
    steps: torch.Tensor              # (batch,) int64
    # Host-side knowledge that every row is greedy: lets eager calls skip the warping and noise entirely.
    # None (unknown, e.g. inside a captured graph) always takes the full branch-free path.
    all_greedy: bool | None = None

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
        )


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """scores: (batch, vocab) fp32; seen: (batch, vocab) bool — ids in the prompt or generated so far.

    transformers: score < 0 → score · penalty, else score / penalty, for each seen id.
    """
    p = penalty[:, None]
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = scores.shape[-1]
    neg_inf = float("-inf")  # transformers filter_value
    # top-k (transformers TopKLogitsWarper): drop scores below the k-th largest; k = 0 keeps all.
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    desc = scores.sort(dim=-1, descending=True).values
    kth = desc.gather(1, (k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, neg_inf)
    # top-p (TopPLogitsWarper): ascending sort, drop the low tail whose cumulative mass is <= 1 - p, keep >= 1.
    asc, idx = scores.sort(dim=-1, descending=False)
    cum = asc.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)[:, None]
    remove[:, -1] = False
    remove = remove.scatter(1, idx, remove)
    return scores.masked_fill(remove, neg_inf)


def sample(logits: torch.Tensor, st: SamplingTensors, seen: torch.Tensor | None = None,
           suppress: torch.Tensor | None = None) -> torch.Tensor:
    """logits: (batch, vocab) any float dtype → next ids (batch,) int64.

    seen: (batch, vocab) bool for the repetition penalty; suppress: (vocab,) bool ids that may never be chosen.
    """
    scores = logits.float()
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, st.repetition_penalty)
    if suppress is not None:
        scores = scores.masked_fill(suppress[None, :], float("-inf"))
    greedy_ids = scores.argmax(dim=-1)
    if st.all_greedy:
        return greedy_ids
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    warped = _top_k_top_p(scores / temp[:, None], st.top_k, st.top_p)
    u = counter_uniform(st.seeds, st.steps, scores.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    sampled_ids = (warped.double().log_softmax(dim=-1) + gumbel).argmax(dim=-1)
    return torch.where(st.temperature > 0, sampled_ids, greedy_ids)

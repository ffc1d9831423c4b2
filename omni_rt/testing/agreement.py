"""Teacher-forced agreement of two thinkers (e.g. FP8 weights vs the unquantized model) — for benchmarks and
GPU tests, not a runtime path.

The reference model extends each prompt greedily; both models then score the same sequence in one causal
prefill, and the per-position next-token predictions are compared: top-1 agreement, and the logit error
relative to the reference's largest logit.
"""
from __future__ import annotations

import torch

from ..models.layers import AttentionMetadata

_BLOCK = 16


def teacher_forced_logits(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) fp32 logits of the thinker of ``model`` (an OmniModel) over ``ids`` in one prefill."""
    th = model.thinker
    tc = th.cfg.text
    p = next(th.lm_head.parameters())
    device, dtype = p.device, p.dtype
    t = len(ids)
    blocks = -(-t // _BLOCK)
    caches = [(torch.zeros(blocks, _BLOCK, tc.num_key_value_heads, tc.head_dim, device=device, dtype=dtype),
               torch.zeros(blocks, _BLOCK, tc.num_key_value_heads, tc.head_dim, device=device, dtype=dtype))
              for _ in range(tc.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t, device=device),
        block_tables=torch.arange(blocks, device=device, dtype=torch.int32)[None],
        context_lens=torch.tensor([t], device=device, dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, t], device=device, dtype=torch.int32), max_query_len=t)
    with torch.inference_mode():
        x = th.embed(torch.tensor(ids, device=device))
        positions = torch.arange(t, device=device).expand(3, t)
        hidden, _ = th(x, positions, caches, meta)
        return th.logits(hidden).float().cpu()


def greedy_continuation(model, prompt: list[int], steps: int) -> list[int]:
    """``prompt`` + ``steps`` greedy tokens of ``model`` (re-scoring the whole sequence each step: short runs)."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(teacher_forced_logits(model, seq)[-1].argmax()))
    return seq


def agreement(reference, model, prompts: list[list[int]], steps: int = 32) -> dict[str, float]:
    """Top-1 agreement and logit errors of ``model`` against ``reference`` on the reference's greedy
    continuations of ``prompts`` (positions from the last prompt token on)."""
    agree = total = 0
    worst_rel = mean_abs = 0.0
    for prompt in prompts:
        seq = greedy_continuation(reference, prompt, steps)
        ref = teacher_forced_logits(reference, seq)[len(prompt) - 1:]
        got = teacher_forced_logits(model, seq)[len(prompt) - 1:]
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0]
        err = (got - ref).abs()
        worst_rel = max(worst_rel, (err.max() / ref.abs().max().clamp_min(1e-30)).item())
        mean_abs += err.mean().item() * ref.shape[0]
    return {"top1_agreement": agree / total, "positions": total, "max_logit_err_rel": worst_rel,
            "mean_abs_logit_err": mean_abs / total}

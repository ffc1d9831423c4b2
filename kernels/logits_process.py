"""The sampler's score processing in one launch: logits (any float dtype) → float32 scores with the repetition
penalty on the ids seen so far and the suppressed ids at -inf — what took up to seven ATen ops (cast, lt, mul,
div, where, where, masked_fill) over the whole vocabulary.

    s = float32(logits)
    s = seen ? (s < 0 ? s · penalty : s / penalty) : s          (transformers RepetitionPenaltyLogitsProcessor)
    s = suppress ? -inf : s                                      (SuppressTokensLogitsProcessor)

Grid (batch, cdiv(vocab, BLOCK)): static for static shapes, CUDA-graph safe, no host reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["logits_process", "logits_process_ref", "COMPILE_SPECS"]

_BLOCK = 1024


def logits_process_ref(logits: torch.Tensor, seen: torch.Tensor | None, penalty: torch.Tensor | None,
                       suppress: torch.Tensor | None) -> torch.Tensor:
    """PyTorch reference. logits (B, V); seen (B, V) bool or None; penalty (B,) fp32 (needed with seen);
    suppress (V,) bool or None → (B, V) fp32."""
    scores = logits.float()
    if seen is not None:
        p = penalty[:, None]
        penalised = torch.where(scores < 0, scores * p, scores / p)
        scores = torch.where(seen, penalised, scores)
    if suppress is not None:
        scores = scores.masked_fill(suppress[None, :], float("-inf"))
    return scores


@triton.jit
def _logits_process_kernel(logits_ptr, seen_ptr, penalty_ptr, suppress_ptr, out_ptr, n, stride_l, stride_s,
                           stride_o, HAS_SEEN: tl.constexpr, HAS_SUPPRESS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SEEN:
        p = tl.load(penalty_ptr + row)
        s = tl.load(seen_ptr + row * stride_s + offs, mask=mask, other=0)
        x = tl.where(s != 0, tl.where(x < 0, x * p, x / p), x)
    if HAS_SUPPRESS:
        sup = tl.load(suppress_ptr + offs, mask=mask, other=0)
        x = tl.where(sup != 0, float("-inf"), x)
    tl.store(out_ptr + row * stride_o + offs, x, mask=mask)


def logits_process(logits: torch.Tensor, seen: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
                   suppress: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 scores (B, V); arguments as ``logits_process_ref``. Rows may be strided; the vocab dim contiguous."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got {tuple(logits.shape)}")
    b, n = logits.shape
    if seen is not None and (seen.shape != (b, n) or seen.dtype != torch.bool):
        raise ValueError(f"seen must be ({b}, {n}) bool, got {tuple(seen.shape)} {seen.dtype}")
    if seen is not None and (penalty is None or penalty.shape != (b,)):
        raise ValueError(f"penalty must be ({b},) with seen")
    if suppress is not None and (suppress.shape != (n,) or suppress.dtype != torch.bool):
        raise ValueError(f"suppress must be ({n},) bool, got {tuple(suppress.shape)} {suppress.dtype}")
    tensors = [t for t in (logits, seen, penalty, suppress) if t is not None]
    if seen is None and suppress is None and logits.dtype == torch.float32:
        return logits   # nothing to do: no launch (the reference's .float() is a no-op too)
    if not use_triton(*tensors):
        return logits_process_ref(logits, seen, penalty, suppress)
    out = torch.empty((b, n), dtype=torch.float32, device=logits.device)
    if out.numel() == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    seen_u8 = None if seen is None else (seen if seen.stride(1) == 1 else seen.contiguous()).view(torch.uint8)
    sup_u8 = None if suppress is None else suppress.contiguous().view(torch.uint8)
    pen = None if penalty is None else penalty.float().contiguous()
    _logits_process_kernel[(b, triton.cdiv(n, _BLOCK))](
        logits, seen_u8 if seen_u8 is not None else out, pen if pen is not None else out,
        sup_u8 if sup_u8 is not None else out, out, n, logits.stride(0),
        seen_u8.stride(0) if seen_u8 is not None else 0, out.stride(0),
        HAS_SEEN=seen is not None, HAS_SUPPRESS=suppress is not None, BLOCK=_BLOCK, num_warps=4)
    return out


def _spec(dtype: str, seen: bool, suppress: bool) -> KernelSpec:
    return KernelSpec(name=f"logits_process_{dtype}_{'seen' if seen else 'noseen'}_{'sup' if suppress else 'nosup'}",
                      fn=_logits_process_kernel,
                      signature={"logits_ptr": f"*{dtype}", "seen_ptr": "*u8", "penalty_ptr": "*fp32",
                                 "suppress_ptr": "*u8", "out_ptr": "*fp32", "n": "i32", "stride_l": "i32",
                                 "stride_s": "i32", "stride_o": "i32"},
                      constexprs={"HAS_SEEN": seen, "HAS_SUPPRESS": suppress, "BLOCK": _BLOCK},
                      num_warps=4, num_stages=1)


# thinker (penalty, bf16 or fp32 logits), talker code 0 (penalty + suppressed ids), suppression alone
COMPILE_SPECS = [_spec("bf16", True, False), _spec("fp32", True, False), _spec("bf16", True, True),
                 _spec("fp32", True, True), _spec("bf16", False, True)]

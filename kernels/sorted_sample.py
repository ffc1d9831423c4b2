"""One draw per row from a descending-sorted candidate list, in one launch: temperature, top-k, top-p and a
Gumbel-max draw with the counter-based noise, plus the greedy/sampled select — what the sampler did with about
thirty ATen ops over the whole vocabulary (two sorts, log_softmax, cumsum, scatter, ...).

Inputs per row r (n candidates, sorted descending: ``torch.topk`` or ``torch.sort(descending=True)`` of the
processed scores, any float dtype, read in fp32): ``vals[r, j]`` the score, ``idx[r, j]`` its token id. Per row, as transformers'
``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper`` → multinomial::

    x_j    = vals_j / T                                      (T = temperature; 1 for greedy rows)
    keep_k = x_j >= x_(k-1)                                  (k = top_k; 0 or >= n: all n; ties at the k-th kept)
    p_j    = softmax over the keep_k set
    keep_p = top_p >= 1  or  j == 0  or  1 - Σ_{i<j} p_i > 1 - top_p   (transformers removes the ascending tail
                                                                        whose cumulative mass is <= 1 - top_p)
    id     = idx[argmax_j over keep_k & keep_p of (x_j + G(seed, step, idx_j))]     (Gumbel-max = a softmax draw)
    out    = id if T > 0 else greedy[r]

The noise is the counter-based hash of ``kernels.counter_uniform`` at (seed, step, token id) — the same
(seed, step, column) semantics as before, so a request's draw never depends on its batch mates — taken in
float32: u = (top 23 bits of the hash + 0.5) / 2²³, exact in fp32, E = -log(u) (a series in 1 - u near 1, where
log(u) loses its relative precision), G = -log(E). No float64 anywhere.

Exactness: when every sampled row has 1 <= top_k <= n, the top-k survivors are all among the candidates (up to
ties with the k-th score continuing past the last candidate) and this is the full-vocabulary computation; with
n = the vocabulary (a full sort) it is exact for any top_k/top_p. ``omni_rt.sampling`` picks which.

One program per row; the candidates are walked in BLOCK-wide tiles (two passes: the softmax denominator, then
the top-p prefix mass and the draw), so the grid and shapes are static — CUDA-graph safe, no host reads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelSpec, use_triton
from .counter_uniform import _hash32, _mix

__all__ = ["sorted_sample", "sorted_sample_ref", "counter_bits", "gumbel_from_bits", "COMPILE_SPECS"]

_INV_2_23 = 1.0 / 8388608.0
_MAX_BLOCK = 1024


def counter_bits(seeds: torch.Tensor, steps: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The counter hash of ``counter_uniform_ref`` at arbitrary columns: seeds, steps (B,) int64, cols (B, n)
    int64 → (B, n) int64 in [0, 2³²)."""
    base = _hash32(steps[:, None] * 0x632BE5AB + _hash32(seeds[:, None]))
    return _hash32(_hash32(cols * 0x9E3779B1 + base) + (seeds[:, None] >> 32))


def gumbel_from_bits(h: torch.Tensor) -> torch.Tensor:
    """Hash bits (int64 in [0, 2³²)) → standard Gumbel noise, float32 (the kernel's formula, op for op)."""
    u = ((h >> 9).to(torch.float32) + 0.5) * _INV_2_23
    w = 1.0 - u                                                    # exact: u is a multiple of 2^-24
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0))))))
    e = torch.where(w < 0.0625, series, -torch.log(u))             # E = -log(u) > 0
    return -torch.log(e)


def sorted_sample_ref(vals: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                      step_offset: int = 0) -> torch.Tensor:
    """PyTorch reference (the CPU path; static shapes, no host reads, so it traces with fullgraph=True).

    vals (B, n) float (fp32, bf16, fp16: taken in fp32) sorted descending per row, idx (B, n) int64 their token
    ids, scores (B, V) the row they were taken from (the greedy rows' argmax); temperature, top_p (B,) fp32;
    top_k, seeds, steps (B,) int64; the counter step of row r is steps[r] + step_offset → (B,) int64.
    """
    b, n = vals.shape
    greedy = scores.argmax(dim=-1)
    if n == 0:
        return greedy
    sampled = temperature > 0
    t = torch.where(sampled, temperature, torch.ones_like(temperature))
    x = vals.float() / t[:, None]
    k = torch.where((top_k > 0) & (top_k < n), top_k, torch.full_like(top_k, n))
    kth = x.gather(1, (k - 1)[:, None])
    m = x[:, :1]
    alive = (x >= kth) & (x > float("-inf"))
    e = torch.where(alive, torch.exp(x - torch.where(m > float("-inf"), m, torch.zeros_like(m))),
                    torch.zeros_like(x))
    z = e.sum(dim=1, keepdim=True)
    prob = e / torch.where(z > 0, z, torch.ones_like(z))
    before = torch.cumsum(prob, dim=1) - prob
    first = torch.arange(n, device=vals.device)[None, :] == 0
    keep = alive & ((top_p[:, None] >= 1) | first | (1.0 - before > (1.0 - top_p)[:, None]))
    key = torch.where(keep, x + gumbel_from_bits(counter_bits(seeds, steps + step_offset, idx)), float("-inf"))
    drawn = idx.gather(1, key.argmax(dim=1, keepdim=True))[:, 0]
    drawn = torch.where(keep.any(dim=1), drawn, greedy)  # nothing drawable (all -inf): the greedy id
    return torch.where(sampled, drawn, greedy)


@triton.jit
def _gumbel(h):
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07   # 2^-23
    w = 1.0 - u
    series = w * (1.0 + w * (0.5 + w * (0.3333333432674408 + w * (0.25 + w * (0.20000000298023224
                                                                              + w * 0.1666666716337204)))))
    e = tl.where(w < 0.0625, series, -tl.log(u))
    return -tl.log(e)


@triton.jit
def _sorted_sample_kernel(vals_ptr, idx_ptr, scores_ptr, temp_ptr, topk_ptr, topp_ptr, seeds_ptr, steps_ptr,
                          out_ptr, n, vocab, stride_v, stride_i, stride_s, step_offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    vrow = vals_ptr + row * stride_v
    irow = idx_ptr + row * stride_i
    temp = tl.load(temp_ptr + row)
    t = tl.where(temp > 0, temp, 1.0)
    k = tl.load(topk_ptr + row).to(tl.int64)
    k = tl.where((k > 0) & (k < n), k, n)
    p = tl.load(topp_ptr + row)
    # top_p >= 1: no top-p (transformers adds no TopPLogitsWarper); 1 - before >= 0 > -1 keeps every candidate
    thr = tl.where(p >= 1.0, -1.0, 1.0 - p)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    step = tl.load(steps_ptr + row).to(tl.int64) + step_offset
    base = _mix(step * 0x632BE5AB + _mix(seed))
    hi = seed >> 32
    top = tl.load(vrow).to(tl.float32)                   # the row's maximum score
    m = top / t
    m = tl.where(m > float("-inf"), m, 0.0)
    kth = tl.load(vrow + (k - 1)).to(tl.float32) / t
    offs0 = tl.arange(0, BLOCK)
    # pass 1: the softmax denominator over the top-k survivors, and the greedy id: the first (smallest) id
    # scoring the maximum, as torch.argmax — every id tied at the maximum is a candidate unless the tie run
    # fills the whole candidate list, and then the scores row itself is scanned (a loop of 0 trips otherwise)
    z = tl.zeros((), dtype=tl.float32)
    greedy = tl.full((), 0x7FFFFFFFFFFFFFFF, tl.int64)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        v = tl.load(vrow + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
        x = v / t
        alive = (offs < n) & (x >= kth) & (x > float("-inf"))
        z += tl.sum(tl.where(alive, tl.exp(x - m), 0.0), axis=0)
        ids = tl.load(irow + offs, mask=offs < n, other=0).to(tl.int64)
        greedy = tl.minimum(greedy, tl.min(tl.where((offs < n) & (v == top), ids, 0x7FFFFFFFFFFFFFFF), axis=0))
    z = tl.where(z > 0, z, 1.0)  # nothing alive (every score -inf): no probabilities, the greedy id comes back
    tie_fills = tl.load(vrow + (n - 1)).to(tl.float32) == top
    scan = tl.where(tie_fills, vocab, 0)
    srow = scores_ptr + row * stride_s
    first = tl.full((), 0x7FFFFFFFFFFFFFFF, tl.int64)
    for start in range(0, scan, BLOCK):
        offs = start + offs0
        s = tl.load(srow + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        first = tl.minimum(first, tl.min(tl.where((offs < vocab) & (s == top), offs.to(tl.int64),
                                                  0x7FFFFFFFFFFFFFFF), axis=0))
    greedy = tl.where(tie_fills, first, greedy)
    # pass 2: top-p by the mass before each candidate, and the Gumbel-max draw over the kept ones
    carry = tl.zeros((), dtype=tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_id = greedy
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        x = tl.load(vrow + offs, mask=inb, other=float("-inf")).to(tl.float32) / t
        alive = inb & (x >= kth) & (x > float("-inf"))
        prob = tl.where(alive, tl.exp(x - m), 0.0) / z
        before = carry + tl.cumsum(prob, axis=0) - prob
        keep = alive & ((offs == 0) | (1.0 - before > thr))
        ids = tl.load(irow + offs, mask=inb, other=0).to(tl.int64)
        h = _mix(_mix(ids * 0x9E3779B1 + base) + hi)
        key = tl.where(keep, x + _gumbel(h), float("-inf"))
        blk = tl.max(key, axis=0)
        pos = tl.argmax(key, axis=0)
        blk_id = tl.sum(tl.where(offs0 == pos, ids, 0), axis=0)
        take = blk > best
        best_id = tl.where(take, blk_id, best_id)
        best = tl.where(take, blk, best)
        carry += tl.sum(prob, axis=0)
    tl.store(out_ptr + row, tl.where(temp > 0, best_id, greedy))


def _block(n: int) -> int:
    return min(_MAX_BLOCK, max(16, triton.next_power_of_2(max(n, 1))))


def sorted_sample(vals: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, temperature: torch.Tensor,
                  top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  step_offset: int = 0) -> torch.Tensor:
    """Next ids (B,) int64 from sorted candidates; arguments as ``sorted_sample_ref``. vals/idx may be strided
    along the batch dim (contiguous along candidates)."""
    if vals.dim() != 2 or idx.shape != vals.shape:
        raise ValueError(f"vals and idx must both be (batch, n), got {tuple(vals.shape)}, {tuple(idx.shape)}")
    b, n = vals.shape
    if scores.dim() != 2 or scores.shape[0] != b or scores.shape[1] < n or scores.dtype != vals.dtype:
        raise ValueError(f"scores must be ({b}, >= {n}) {vals.dtype}, got {tuple(scores.shape)} {scores.dtype}")
    for name, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                    ("seeds", seeds), ("steps", steps)):
        if v.shape != (b,):
            raise ValueError(f"{name} must be ({b},), got {tuple(v.shape)}")
    if vals.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"vals must be float32, bfloat16 or float16, got {vals.dtype}")
    if not use_triton(vals, idx, scores, temperature, top_k, top_p, seeds, steps):
        return sorted_sample_ref(vals, idx, scores, temperature, top_k, top_p, seeds, steps, step_offset)
    if n == 0:
        raise ValueError("no candidates: the vocabulary is empty")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    if vals.stride(1) != 1:
        vals = vals.contiguous()
    if idx.stride(1) != 1:
        idx = idx.contiguous()
    out = torch.empty(b, dtype=torch.int64, device=vals.device)
    if b == 0:
        return out
    args = [t.contiguous() for t in (temperature.float(), top_k, top_p.float(), seeds, steps)]
    _sorted_sample_kernel[(b,)](vals, idx, scores, *args, out, n, scores.shape[1], vals.stride(0), idx.stride(0),
                                scores.stride(0), step_offset, BLOCK=_block(n), num_warps=4)
    return out


def _spec(block: int, vals_ty: str = "fp32") -> KernelSpec:
    return KernelSpec(name=f"sorted_sample_{vals_ty}_b{block}", fn=_sorted_sample_kernel,
                      signature={"vals_ptr": f"*{vals_ty}", "idx_ptr": "*i64", "scores_ptr": f"*{vals_ty}",
                                 "temp_ptr": "*fp32", "topk_ptr": "*i64", "topp_ptr": "*fp32", "seeds_ptr": "*i64",
                                 "steps_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "vocab": "i32",
                                 "stride_v": "i32", "stride_i": "i32", "stride_s": "i32", "step_offset": "i32"},
                      constexprs={"BLOCK": block}, num_warps=4, num_stages=1)


# 256: the sampler's candidate set (CANDIDATES in omni_rt.sampling); 1024: the full-vocabulary path's tiles.
# bf16: the code predictor's raw logits (no penalty, no suppression: no fp32 copy is made).
COMPILE_SPECS = [_spec(256), _spec(1024), _spec(64), _spec(256, "bf16"), _spec(1024, "bf16")]

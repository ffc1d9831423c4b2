"""Fused mixture-of-experts FFN (Qwen3-Omni thinker and talker sparse MoE blocks).

Semantics follow transformers' ``Qwen3OmniMoeThinkerTextSparseMoeBlock`` / ``...TalkerTextSparseMoeBlock``
(modeling_qwen3_omni_moe.py, 5.23.0):

    logits  = x @ gate.T                                   # (tokens, E), x's dtype
    weights = softmax(logits, fp32) -> top-k -> /sum (norm_topk_prob) -> cast to logits' dtype
    out_e   = down_e(silu(gate_e(x)) * up_e(x))            # gate_up_proj[e] = [gate; up]: (2I, H)
    out     = sum_k weights_k * out_{e_k}
    talker: out += sigmoid(x @ shared_expert_gate.T) * down_s(silu(gate_s(x)) * up_s(x))

The Triton path (``run_experts``) picks one of two shapes of work:

- decode, ``M*top_k < E``: ``_moe_gate_up_decode_kernel`` (one program per (assignment, N tile): a GEMV
  against the expert named by ``topk_ids``, SiLU*mul in the epilogue -> ``h: (M*top_k, I)``) and
  ``_moe_down_sum_kernel`` (one program per (token, N tile): the token's top_k down GEMVs in a fixed order,
  each rounded and weighted as the reference does, summed in fp32 -> ``(M, H)``). No alignment pass, no
  atomics; the N tile shrinks until a batch-1 step launches >= ``DECODE_TARGET_CTAS`` programs.
- prefill, ``M*top_k >= E`` (vLLM's fused-MoE scheme, trimmed): ``moe_align`` (one launch of
  ``_moe_align_kernel``: the assignments grouped by expert, each group padded to a multiple of BLOCK_M, a
  fixed output size, no host sync), the grouped GEMMs ``_moe_gate_up_kernel`` and ``_moe_down_kernel`` (routing
  weight in the epilogue -> ``(M*top_k, H)``), and ``view(M, top_k, H).sum(1)``: folding that sum into the
  GEMM would need float atomics (a token's rows lie in different blocks).

``route`` (one launch of ``_route_kernel``) can also weigh always-on experts: the talker's shared expert,
split along its intermediate dimension into extra experts and gated by sigmoid(shared_expert_gate(x)) (see
``models.moe``). Every GEMM kernel also takes block-FP8 expert weights (``SCALED``: codes times their
128x128 block scale, dequantized inside the K loop); ``fused_moe_fp8`` is that launcher.

The grouped GEMMs' launch configs (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) come from a JSON table keyed by the token
count M (``kernels/configs/fused_moe_default.json``, or ``fused_moe_<device name>.json`` when present for
the running GPU, e.g. ``fused_moe_NVIDIA_H100_80GB_HBM3.json``); the nearest M wins, and ``DEFAULT_CONFIG``
is used when no table can be read. Configs are then shrunk (stages, then BLOCK_K) until the gate/up
kernel's pipelined tiles fit ``SMEM_BUDGET`` bytes, which covers sm_80 (163 KiB) as well as sm_90.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re

import torch
import triton
import triton.language as tl

from . import KernelSpec, graph_safe_enabled, use_triton

__all__ = [
    "fused_moe", "fused_moe_ref", "fused_moe_static", "run_experts", "route", "route_ref", "moe_align",
    "moe_align_ref", "decode_block_n", "get_config", "DEFAULT_CONFIG", "COMPILE_SPECS",
]

logger = logging.getLogger(__name__)

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

# Used when the JSON table is missing or unreadable: small-M friendly (decode is the hot path); BLOCK_M=16
# is the smallest tile tl.dot accepts.
DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}

# sm_80 allows 163 KiB of dynamic shared memory per block (sm_90: 227 KiB); keep 3 KiB for the epilogue's
# layout-conversion scratch.
SMEM_BUDGET = 160 * 1024


# --------------------------------------------------------------------------------------------------------
# Launch configuration table
# --------------------------------------------------------------------------------------------------------

def _device_file_name(device_name: str) -> str:
    return "fused_moe_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name.strip()) + ".json"


@functools.lru_cache(maxsize=None)
def _load_table(device_name: str | None) -> tuple[tuple[int, tuple[tuple[str, int], ...]], ...]:
    """M -> config table for ``device_name`` (falls back to the default file, then to ``DEFAULT_CONFIG``).

    Returned as nested tuples so the cached value cannot be mutated by callers.
    """
    candidates = []
    if device_name:
        candidates.append(os.path.join(_CONFIG_DIR, _device_file_name(device_name)))
    candidates.append(os.path.join(_CONFIG_DIR, "fused_moe_default.json"))
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                raw = json.load(f)
            table = []
            for key, cfg in raw.items():
                if not key.isdigit():  # "_doc" and other annotations
                    continue
                missing = [k for k in _CONFIG_KEYS if k not in cfg]
                if missing:
                    raise ValueError(f"M={key} lacks {missing}")
                table.append((int(key), tuple((k, int(cfg[k])) for k in _CONFIG_KEYS)))
            if table:
                return tuple(sorted(table))
        except (OSError, ValueError) as exc:
            logger.warning("fused_moe: ignoring unreadable config table %s (%s)", path, exc)
    logger.warning("fused_moe: no config table found, using DEFAULT_CONFIG; performance may be sub-optimal")
    return ((1, tuple((k, DEFAULT_CONFIG[k]) for k in _CONFIG_KEYS)),)


def _smem_bytes(cfg: dict, elem_bytes: int) -> int:
    # The gate/up kernel is the larger of the two: one A tile and two B tiles per pipeline stage.
    stage = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem_bytes
    return stage * max(cfg["num_stages"], 1)


def fit_config(cfg: dict, dtype: torch.dtype) -> dict:
    """Adapt a table entry (written for 2-byte dtypes) to ``dtype``.

    fp32 gets BLOCK_K <= 32 and BLOCK_M*BLOCK_N <= 512 (register pressure of FMA dots); then num_stages
    (down to 2) and BLOCK_K (down to 16) shrink until the gate/up tiles fit ``SMEM_BUDGET``.
    """
    cfg = dict(cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.float32:
        # IEEE fp32 dots are FMA loops whose operand layouts live in registers (no tensor cores): bound the
        # tile so sm_80 does not spill.
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
        while cfg["BLOCK_M"] * cfg["BLOCK_N"] > 512 and cfg["BLOCK_N"] > 32:
            cfg["BLOCK_N"] //= 2
        while cfg["BLOCK_M"] * cfg["BLOCK_N"] > 512 and cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
    while _smem_bytes(cfg, elem) > SMEM_BUDGET and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while _smem_bytes(cfg, elem) > SMEM_BUDGET and cfg["BLOCK_K"] > 16:
        cfg["BLOCK_K"] //= 2
    return cfg


def get_config(m: int, dtype: torch.dtype = torch.bfloat16, device_name: str | None = None) -> dict:
    """Launch config for ``m`` tokens: nearest-M entry of the device's (or the default) table, fitted to
    shared memory for ``dtype``."""
    table = _load_table(device_name)
    _, best = min(table, key=lambda entry: (abs(entry[0] - m), entry[0]))
    return fit_config(dict(best), dtype)


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)

# --------------------------------------------------------------------------------------------------------
# Routing and alignment
# --------------------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, num_shared: int = 0):
    """Top-k routing as in transformers' ``Qwen3OmniMoe*TopKRouter``, optionally with always-on experts.

    router_logits: (tokens, E) in the activations' dtype; with ``num_shared`` = S > 0, (tokens, E + 1) whose
    last column is the shared expert's gate logit (``shared_expert_gate``, appended as one more router row).
    Returns ``(weights, ids)``: weights (tokens, top_k + S) in ``router_logits.dtype`` (softmax and
    renormalisation over the E routed logits in fp32 first; the S extra weights are sigmoid(gate logit)),
    ids (tokens, top_k + S) int64, the extra columns holding experts E .. E+S-1 (the shared expert split
    into S experts along its intermediate dimension, see ``models.moe``).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be (tokens, E), got {tuple(router_logits.shape)}")
    if num_shared < 0:
        raise ValueError(f"num_shared must be >= 0, got {num_shared}")
    e = router_logits.shape[1] - (1 if num_shared else 0)
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, E={e}]")
    if use_triton(router_logits):
        return _route_triton(router_logits, top_k, norm_topk_prob, num_shared)
    return route_ref(router_logits, top_k, norm_topk_prob, num_shared)


def route_ref(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, num_shared: int = 0):
    """PyTorch :func:`route` (the CPU path and the tests' truth)."""
    logits = router_logits[:, :-1] if num_shared else router_logits
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(router_logits.dtype)
    if num_shared:
        # as the talker's block: torch.sigmoid(shared_expert_gate(x)), in the activations' dtype
        gate = torch.sigmoid(router_logits[:, -1:])
        e = logits.shape[1]
        shared_ids = torch.arange(e, e + num_shared, device=ids.device).expand(ids.shape[0], num_shared)
        weights = torch.cat([weights, gate.expand(-1, num_shared)], dim=1)
        ids = torch.cat([ids, shared_ids], dim=1)
    return weights, ids


def _route_triton(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, num_shared: int):
    m, cols = router_logits.shape
    width = top_k + num_shared
    weights = torch.empty((m, width), dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty((m, width), dtype=torch.int64, device=router_logits.device)
    if m == 0:
        return weights, ids
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    e = cols - (1 if num_shared else 0)
    block_e = triton.next_power_of_2(e)
    _route_kernel[(m,)](router_logits, weights, ids, e, router_logits.stride(0), weights.stride(0), ids.stride(0),
                        TOP_K=top_k, NUM_SHARED=num_shared, BLOCK_K=triton.next_power_of_2(width),
                        BLOCK_E=block_e, NORM=norm_topk_prob, num_warps=1 if block_e <= 256 else 4)
    return weights, ids


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the (token, k) assignments into blocks of ``block_m`` rows that each belong to one expert: sorted
    by expert (stable: token order within an expert), each expert's group padded to a multiple of ``block_m``.
    The layout of the grouped GEMMs (``M*top_k >= E``: prefill); decode needs none (see ``fused_moe``).
    One launch on the Triton path (``_moe_align_kernel``), :func:`moe_align_ref` otherwise; both give the
    same tensors.

    topk_ids: (M, top_k) integer expert ids in [0, E). Returns, all on ``topk_ids.device``:

    - ``sorted_ids``: (num_blocks*block_m,) int32 with ``num_blocks = cdiv(M*top_k + E*(block_m-1), block_m)``,
      flat assignment indices ``m*top_k + k`` grouped by expert; padding slots hold the sentinel ``M*top_k``.
      Every block the GEMMs load lies inside the tensor.
    - ``expert_ids``: (num_blocks,) int32, the expert of each block, -1 for blocks past the padded end (the
      GEMM kernels skip them).
    - ``total``: (1,) int32, the padded length actually used.

    The output size depends only on (M, top_k, E, block_m), never on the routing, and no value is read
    back to the host, so this can be captured in a CUDA graph / traced with ``fullgraph=True``.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (M, top_k), got {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if use_triton(topk_ids) and topk_ids.numel() > 0:
        return _moe_align_triton(topk_ids, num_experts, block_m)
    return moe_align_ref(topk_ids, num_experts, block_m)


def _num_blocks(n_assign: int, num_experts: int, block_m: int) -> int:
    # every expert's group wastes at most block_m - 1 padding rows
    return triton.cdiv(n_assign + num_experts * (block_m - 1), block_m)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """:func:`moe_align` with sort-based torch device ops (fixed shapes, no host sync)."""
    device = topk_ids.device
    n_assign = topk_ids.numel()
    num_blocks = _num_blocks(n_assign, num_experts, block_m)
    flat = topk_ids.reshape(-1).to(torch.int64)
    # scatter_add instead of bincount: bincount sizes its output from max(input), a host sync.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + (block_m - 1)) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts

    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    rank = torch.arange(n_assign, device=device) - cnt_start[sorted_expert]
    dest = pad_start[sorted_expert] + rank
    sorted_ids = torch.full((num_blocks * block_m,), n_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    expert_ids = torch.searchsorted(pad_end, block_start, right=True)
    total = pad_end[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, torch.full_like(expert_ids, -1)).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)


# Assignments one alignment program scans per step (a power of two: tl.arange / tl.histogram sizes; one value,
# so one compiled variant serves every prefill size).
_ALIGN_CHUNK = 1024


def _moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    n_assign = topk_ids.numel()
    device = topk_ids.device
    num_blocks = _num_blocks(n_assign, num_experts, block_m)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    _moe_align_kernel[(num_experts,)](
        ids, sorted_ids, expert_ids, total, n_assign, num_blocks, num_experts,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_A=_ALIGN_CHUNK,
        BLOCK_M=block_m, num_warps=4)
    return sorted_ids, expert_ids, total


# --------------------------------------------------------------------------------------------------------
# Triton kernels: routing, alignment
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, stride_w, stride_i,
                  TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  NORM: tl.constexpr):
    # One token: fp32 softmax over the experts, top-k by repeated argmax (lowest index first on ties), the
    # renormalisation in fp32, weights rounded to the logits' dtype. One launch for route()'s five ops.
    # NUM_SHARED > 0: column E of the logits is the shared expert's gate; its sigmoid (rounded to the logits'
    # dtype, as torch.sigmoid on a 16-bit tensor) is the weight of experts E .. E+NUM_SHARED-1.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)
    p = tl.where(mask, tl.exp(x), 0.0)
    p = p / tl.sum(p, axis=0)
    p = tl.where(mask, p, -1.0)
    k_offs = tl.arange(0, BLOCK_K)
    vals = tl.zeros([BLOCK_K], dtype=tl.float32)
    idxs = tl.zeros([BLOCK_K], dtype=tl.int32)
    for kk in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
        vals = tl.where(k_offs == kk, best, vals)
        idxs = tl.where(k_offs == kk, idx, idxs)
        p = tl.where(offs == idx, -1.0, p)
    if NORM:
        vals = vals / tl.sum(vals, axis=0)
    out_ty = w_ptr.dtype.element_ty
    vals = vals.to(out_ty)
    if NUM_SHARED > 0:
        g = tl.load(logits_ptr + row * stride_l + E).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-g))).to(out_ty)
        shared = (k_offs >= TOP_K) & (k_offs < TOP_K + NUM_SHARED)
        vals = tl.where(shared, gate, vals)
        idxs = tl.where(shared, E + k_offs - TOP_K, idxs)
    kmask = k_offs < TOP_K + NUM_SHARED
    tl.store(ids_ptr + row * stride_i + k_offs, idxs.to(tl.int64), mask=kmask)
    tl.store(w_ptr + row * stride_w + k_offs, vals, mask=kmask)


@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, n_assign, num_blocks, E,
                      BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr):
    # Program e owns expert e's group. Every program takes the histogram of all assignments (a cheap pass over
    # n_assign ids) so it knows where its padded group starts without a second launch; it then writes its own
    # assignment ids in increasing order (a running rank + an in-chunk prefix sum: the layout never depends on
    # scheduling), the sentinel in its group's padding, its blocks' expert id, and one block of the tail past
    # the padded end (the tail spans at most E blocks: see _num_blocks).
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_a = tl.arange(0, BLOCK_A)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for a0 in range(0, n_assign, BLOCK_A):
        a_mask = a0 + offs_a < n_assign
        ids = tl.load(ids_ptr + a0 + offs_a, mask=a_mask, other=0).to(tl.int32)
        counts += tl.histogram(ids, BLOCK_E, mask=a_mask)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    end = start + tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    total = tl.sum(padded, axis=0)
    if e == 0:
        tl.store(total_ptr, total)

    rank = start
    for a0 in range(0, n_assign, BLOCK_A):
        a_mask = a0 + offs_a < n_assign
        ids = tl.load(ids_ptr + a0 + offs_a, mask=a_mask, other=-1)
        hit = (ids == e) & a_mask
        pos = rank + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(sorted_ids_ptr + pos, a0 + offs_a, mask=hit)
        rank += tl.sum(hit.to(tl.int32), axis=0)
    offs_m = tl.arange(0, BLOCK_M)
    # padding of the group's last block (fewer than BLOCK_M slots)
    pad = start + count + offs_m
    tl.store(sorted_ids_ptr + pad, tl.zeros([BLOCK_M], dtype=tl.int32) + n_assign, mask=pad < end)
    for b0 in range(start // BLOCK_M, end // BLOCK_M, BLOCK_A):
        b = b0 + offs_a
        tl.store(expert_ids_ptr + b, tl.zeros([BLOCK_A], dtype=tl.int32) + e, mask=b < end // BLOCK_M)
    tail = total // BLOCK_M + e
    if tail < num_blocks:
        tl.store(expert_ids_ptr + tail, -1)
        tl.store(sorted_ids_ptr + tail * BLOCK_M + offs_m, tl.zeros([BLOCK_M], dtype=tl.int32) + n_assign)


# --------------------------------------------------------------------------------------------------------
# Triton kernels: expert GEMMs (bf16/fp16/fp32 weights, or block-FP8 codes with SCALED)
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _grouped_pid(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Consecutive programs walk GROUP_M row-blocks for one column-block so the weight tile stays in L2.
    pid = tl.program_id(0)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_w(w_base, s_base, offs_k, offs_n, k0, K, N, stride_wk, stride_wn, stride_sk, stride_sn,
            dtype: tl.constexpr, EVEN_K: tl.constexpr, SCALED: tl.constexpr, SCALE_B: tl.constexpr,
            ALIGNED: tl.constexpr):
    # (BLOCK_K, BLOCK_N) tile w[n, k0 + k] of one expert's (N, K) matrix, in ``dtype``. SCALED: FP8 codes times
    # their block scale s[n // SCALE_B, k0 // SCALE_B] (BLOCK_K divides SCALE_B, so a tile never straddles a
    # scale column), rounded to ``dtype``: what dequantize-then-matmul computes. Offsets stay int32 (one
    # expert holds < 2**31 elements); the caller's expert base pointer carries the int64 part.
    n_mask = offs_n < N
    p = w_base + (offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk)
    if ALIGNED:
        # 16-byte aligned rows let loads vectorise (and use cp.async) even when compiled ahead of time
        # without the runtime's pointer-alignment specialisation.
        p = tl.multiple_of(p, [16, 16])
    if EVEN_K:
        w = tl.load(p, mask=n_mask[None, :], other=0.0)
    else:
        w = tl.load(p, mask=((k0 + offs_k) < K)[:, None] & n_mask[None, :], other=0.0)
    if SCALED:
        w = (w.to(tl.float32) * _load_ws(s_base, offs_n, k0, N, stride_sn, stride_sk, SCALE_B)[None, :]).to(dtype)
    return w


@triton.jit
def _load_ws(s_base, offs_n, k0, N, stride_sn, stride_sk, SCALE_B: tl.constexpr):
    # (BLOCK_N,) fp32 block scales of one expert's rows offs_n at K tile k0 (w8a8: applied after the dot).
    return tl.load(s_base + (offs_n // SCALE_B) * stride_sn + (k0 // SCALE_B) * stride_sk, mask=offs_n < N,
                   other=0.0)


@triton.jit
def _w8a8_part(a, a_scale, w_base, s_base, offs_k, offs_n, k0, K, N, stride_wk, stride_wn, stride_sk, stride_sn,
               EVEN_K: tl.constexpr, SCALE_B: tl.constexpr, ALIGNED: tl.constexpr, NATIVE: tl.constexpr):
    # One K tile of a w8a8 GEMM, in fp32: FP8 codes a (BLOCK_M, BLOCK_K) times the expert's codes, scaled by
    # a_scale[row] · w_scale[n] (one scale column per K tile). NATIVE: the FP8 tensor cores (sm_89+); else (the
    # interpreter) the same products in fp32, which are exact for e4m3 codes.
    w = _load_w(w_base, s_base, offs_k, offs_n, k0, K, N, stride_wk, stride_wn, stride_sk, stride_sn, a.dtype,
                EVEN_K, False, SCALE_B, ALIGNED)
    if NATIVE:
        part = tl.dot(a, w)
    else:
        part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return part * a_scale[:, None] * _load_ws(s_base, offs_n, k0, N, stride_sn, stride_sk, SCALE_B)[None, :]


@triton.jit
def _load_rows(rows, offs_k, k0, K, stride_k, row_mask, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr):
    # (BLOCK_M, BLOCK_K) activation tile: ``rows`` (BLOCK_M, 1) row pointers, masked rows read as 0.
    p = rows + (k0 + offs_k)[None, :] * stride_k
    if ALIGNED:
        p = tl.multiple_of(p, [16, 16])
    if EVEN_K:
        return tl.load(p, mask=row_mask[:, None], other=0.0)
    return tl.load(p, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)


@triton.jit
def _load_vec(row, offs_k, k0, K, stride_k, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr):
    # (BLOCK_K,) slice of one activation row, as fp32 (the decode kernels' GEMV operand).
    p = row + (k0 + offs_k) * stride_k
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    if EVEN_K:
        return tl.load(p).to(tl.float32)
    return tl.load(p, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)


@triton.jit
def _swiglu(acc_g, acc_u, out_ty: tl.constexpr):
    # Round where the reference rounds (linear outputs, silu output, product) so 16-bit results track
    # transformers' eager module, not a higher-precision variant of it.
    gate = acc_g.to(out_ty).to(tl.float32)
    up = acc_u.to(out_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    return (act * up).to(out_ty)


@triton.jit
def _weighted(acc, rw, out_ty: tl.constexpr):
    # The reference computes linear (rounded) * routing weight, then rounds the product; returned as fp32.
    return (acc.to(out_ty).to(tl.float32) * rw).to(out_ty).to(tl.float32)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,            # (M, K) activations
    wg_ptr, wu_ptr,   # (E, N, K) gate / up halves of gate_up_proj (same strides)
    sg_ptr, su_ptr,   # SCALED: (E, ceil(N/128), ceil(K/128)) fp32 scales of the halves (same strides)
    xs_ptr,           # ACT_FP8: (M, ceil(K/128)) fp32 per-token-group scales of x (then x holds FP8 codes)
    h_ptr,            # (M*top_k, N) output: silu(gate) * up, by assignment id
    sorted_ids_ptr,   # (num_blocks*BLOCK_M,) flat assignment ids, sentinel = num_assign
    expert_ids_ptr,   # (num_blocks,) expert per block, -1 = past the end
    num_assign, top_k, N, K, num_blocks,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_xsm, stride_xsk,
    stride_hm, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr, SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, ACT_FP8: tl.constexpr, NATIVE_FP8_DOT: tl.constexpr,
):
    # Grouped GEMM over moe_align's blocks (prefill); gate and up tiles share the A tile. ACT_FP8 (w8a8, with
    # SCALED weights): FP8 codes on both sides, each K tile's product scaled by x_scale[token] · w_scale[n].
    pid_m, pid_n = _grouped_pid(num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ids_ptr + offs_m)
    row_mask = assign < num_assign
    token = (assign // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = expert.to(tl.int64)
    x_rows = x_ptr + token[:, None] * stride_xm
    dtype = x_ptr.dtype.element_ty
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a = _load_rows(x_rows, offs_k, k0, K, stride_xk, row_mask, EVEN_K, ALIGNED)
        if ACT_FP8:
            xs = tl.load(xs_ptr + token * stride_xsm + (k0 // SCALE_B) * stride_xsk, mask=row_mask, other=0.0)
            acc_g += _w8a8_part(a, xs, wg_ptr + e64 * stride_we, sg_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N,
                                stride_wk, stride_wn, stride_sk, stride_sn, EVEN_K, SCALE_B, ALIGNED, NATIVE_FP8_DOT)
            acc_u += _w8a8_part(a, xs, wu_ptr + e64 * stride_we, su_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N,
                                stride_wk, stride_wn, stride_sk, stride_sn, EVEN_K, SCALE_B, ALIGNED, NATIVE_FP8_DOT)
        else:
            g = _load_w(wg_ptr + e64 * stride_we, sg_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                        stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
            u = _load_w(wu_ptr + e64 * stride_we, su_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                        stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
    h = _swiglu(acc_g, acc_u, h_ptr.dtype.element_ty)
    h_ptrs = h_ptr + assign.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h, mask=row_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr,            # (M*top_k, K) intermediate, by assignment id
    w_ptr,            # (E, N, K) down_proj
    s_ptr,            # SCALED: (E, ceil(N/128), ceil(K/128)) fp32 scales
    hs_ptr,           # ACT_FP8: (M*top_k, ceil(K/128)) fp32 per-group scales of h (then h holds FP8 codes)
    out_ptr,          # (M*top_k, N) weighted expert outputs, by assignment id (summed over k by the caller)
    topk_w_ptr,       # (M, top_k) routing weights
    sorted_ids_ptr, expert_ids_ptr,
    num_assign, top_k, N, K, num_blocks,
    stride_hm, stride_hk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_hsm, stride_hsk,
    stride_om, stride_on,
    stride_tw_m, stride_tw_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr, SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    ALIGNED: tl.constexpr, ACT_FP8: tl.constexpr, NATIVE_FP8_DOT: tl.constexpr,
):
    # Grouped GEMM h @ down_e.T over moe_align's blocks (prefill), routing weight applied in the epilogue. A
    # token's k rows lie in different blocks: summing them here would take float atomics (run-to-run and
    # batch-mate dependent), so the caller sums over k.
    pid_m, pid_n = _grouped_pid(num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ids_ptr + offs_m)
    row_mask = assign < num_assign
    assign64 = assign.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    e64 = expert.to(tl.int64)
    h_rows = h_ptr + assign64[:, None] * stride_hm
    dtype = h_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a = _load_rows(h_rows, offs_k, k0, K, stride_hk, row_mask, EVEN_K, ALIGNED)
        if ACT_FP8:
            hs = tl.load(hs_ptr + assign64 * stride_hsm + (k0 // SCALE_B) * stride_hsk, mask=row_mask, other=0.0)
            acc += _w8a8_part(a, hs, w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N,
                              stride_wk, stride_wn, stride_sk, stride_sn, EVEN_K, SCALE_B, ALIGNED, NATIVE_FP8_DOT)
        else:
            w = _load_w(w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                        stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    rw = tl.load(topk_w_ptr + (assign // top_k) * stride_tw_m + (assign % top_k) * stride_tw_k,
                 mask=row_mask, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    out = _weighted(acc, rw[:, None], out_ty).to(out_ty)
    o_ptrs = out_ptr + assign64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out, mask=row_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def _moe_gate_up_decode_kernel(
    x_ptr,            # (M, K) activations
    wg_ptr, wu_ptr,   # (E, N, K) gate / up halves (same strides)
    sg_ptr, su_ptr,   # SCALED: fp32 scales of the halves (same strides)
    h_ptr,            # (M*top_k, N) output by assignment id
    ids_ptr,          # (M*top_k,) expert of each assignment (topk_ids, contiguous)
    num_assign, top_k, N, K,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_hm, stride_hn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_B: tl.constexpr, SCALED: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    # Decode (M*top_k < E): one program per (assignment, N tile), a GEMV against the assignment's expert read
    # straight from topk_ids, so no alignment pass runs at all. Assignments vary fastest in the grid: tokens
    # sharing an expert (always the shared expert's parts) read the same tile close together, from L2.
    j = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + j).to(tl.int64)
    token = (j // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token * stride_xm
    dtype = x_ptr.dtype.element_ty
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a = _load_vec(x_row, offs_k, k0, K, stride_xk, EVEN_K, ALIGNED)
        g = _load_w(wg_ptr + expert * stride_we, sg_ptr + expert * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                    stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
        u = _load_w(wu_ptr + expert * stride_we, su_ptr + expert * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                    stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
        acc_g += tl.sum(g.to(tl.float32) * a[:, None], axis=0)
        acc_u += tl.sum(u.to(tl.float32) * a[:, None], axis=0)
    h = _swiglu(acc_g, acc_u, h_ptr.dtype.element_ty)
    tl.store(h_ptr + j.to(tl.int64) * stride_hm + offs_n * stride_hn, h, mask=offs_n < N)


@triton.jit
def _moe_down_sum_kernel(
    h_ptr,            # (M*top_k, K) intermediate by assignment id
    w_ptr,            # (E, N, K) down_proj
    s_ptr,            # SCALED: fp32 scales
    out_ptr,          # (M, N) the MoE output: sum over k of the weighted expert outputs
    topk_w_ptr,       # (M, top_k) routing weights
    ids_ptr,          # (M*top_k,) expert of each assignment (topk_ids, contiguous)
    num_assign, top_k, N, K,
    stride_hm, stride_hk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_om, stride_on,
    stride_tw_m, stride_tw_k,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_B: tl.constexpr, SCALED: tl.constexpr,
    EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    # Decode (M*top_k < E): one program per (token, N tile) runs the token's k expert GEMVs in order k = 0..top_k-1
    # and sums their rounded, weighted outputs in fp32 before one final rounding — the top-k sum folded in, no
    # atomics, so a token's output never depends on its batch mates or on scheduling.
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = h_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kk in range(0, top_k):
        j = (m * top_k + kk).to(tl.int64)
        expert = tl.load(ids_ptr + j).to(tl.int64)
        h_row = h_ptr + j * stride_hm
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k0 = k * BLOCK_K
            a = _load_vec(h_row, offs_k, k0, K, stride_hk, EVEN_K, ALIGNED)
            w = _load_w(w_ptr + expert * stride_we, s_ptr + expert * stride_se, offs_k, offs_n, k0, K, N, stride_wk,
                        stride_wn, stride_sk, stride_sn, dtype, EVEN_K, SCALED, SCALE_B, ALIGNED)
            acc += tl.sum(w.to(tl.float32) * a[:, None], axis=0)
        rw = tl.load(topk_w_ptr + m * stride_tw_m + kk * stride_tw_k).to(tl.float32)
        total += _weighted(acc, rw, out_ty)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n * stride_on, total.to(out_ty), mask=offs_n < N)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Decode kernels: K tile (divides the FP8 scale block, so one launch config serves both weight formats),
# warps, pipeline stages, and the CTA count their N tile is shrunk towards (>= one wave of SMs at batch 1 on
# an H100's 132 SMs; BLOCK_N never below DECODE_MIN_BLOCK_N).
DECODE_BLOCK_K = 128
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3
DECODE_TARGET_CTAS = 128
DECODE_MAX_BLOCK_N = 64
DECODE_MIN_BLOCK_N = 8
# Placeholder scale arguments of unscaled launches (never read: SCALED is a constexpr False).
_NO_SCALE = (None, 0, 0, 0)
# Activation scales of weight-only launches are a placeholder (never read: ACT_FP8 is a constexpr False).
def _act_scale_args(scale, placeholder) -> tuple:
    """(pointer, stride_m, stride_k) of per-token-group activation scales, or of a placeholder when weight-only."""
    return (placeholder, 0, 0) if scale is None else (scale, scale.stride(0), scale.stride(1))


def decode_block_n(rows: int, n: int) -> int:
    """N tile of a decode kernel with ``rows`` programs along its first grid axis: the largest power of two
    in [DECODE_MIN_BLOCK_N, DECODE_MAX_BLOCK_N] giving ``rows * cdiv(n, BLOCK_N) >= DECODE_TARGET_CTAS``
    (sized to the work: a batch-1 step still spreads its weight reads over every SM)."""
    bn = DECODE_MAX_BLOCK_N
    while bn > DECODE_MIN_BLOCK_N and rows * triton.cdiv(n, bn) < DECODE_TARGET_CTAS:
        bn //= 2
    return bn


def _check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids, weight_dtype=None):
    """Shapes, dtypes, devices; ``weight_dtype``: the experts' dtype when it is not x's (FP8 codes)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), got {tuple(x.shape)}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be (E, 2I, H) and down_proj (E, H, I), got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    m, hidden = x.shape
    e, two_i, h_w = gate_up_proj.shape
    if h_w != hidden or two_i % 2:
        raise ValueError(f"gate_up_proj {tuple(gate_up_proj.shape)} does not match hidden={hidden} "
                         f"or has an odd 2I")
    if tuple(down_proj.shape) != (e, hidden, two_i // 2):
        raise ValueError(f"down_proj must be {(e, hidden, two_i // 2)}, got {tuple(down_proj.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must "
                         f"both be (tokens={m}, top_k)")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be integer, got {topk_ids.dtype}")
    wd = weight_dtype or x.dtype
    if x.dtype not in _DTYPES or gate_up_proj.dtype != wd or down_proj.dtype != wd:
        raise ValueError(f"x, gate_up_proj, down_proj must share one of {_DTYPES}, got "
                         f"{x.dtype}, {gate_up_proj.dtype}, {down_proj.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    devices = {t.device for t in (x, gate_up_proj, down_proj, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _resolve_config(config, m, x):
    if config is None:
        name = _cuda_device_name(x.device.index or 0) if x.is_cuda else None
        return get_config(m, x.dtype, name)
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    if config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16 or config["BLOCK_K"] < 16:
        raise ValueError(f"BLOCK_M/N/K must be >= 16 (tl.dot minimum), got {config}")
    return config


def _aligned(*tensors) -> bool:
    """True when every operand is row-major with 16-byte aligned base and rows (enables load hints)."""
    for t in tensors:
        elem = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * elem) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _scale_args(scale, placeholder):
    """(pointer, stride_e, stride_n, stride_k) of a block-scale grid, or of a placeholder when unscaled."""
    if scale is None:
        return (placeholder,) + _NO_SCALE[1:]
    return (scale, scale.stride(0), scale.stride(1), scale.stride(2))


def run_experts(x, gate_up_proj, down_proj, topk_weights, topk_ids, cfg, scales=None, scale_block=128,
                act_fp8=False):
    """Both expert GEMMs on the Triton path; returns (M, H) in x's dtype (M > 0).

    gate_up_proj: (E, 2I, H), down_proj: (E, H, I), in x's dtype, or FP8 codes with ``scales`` = (gate_up
    scale (E, 2·ceil(I/128), ceil(H/128)), down scale (E, ceil(H/128), ceil(I/128))), ``scale_block`` = 128.
    cfg: the grouped GEMMs' launch config (BLOCK_K dividing ``scale_block`` when scaled).
    act_fp8 (FP8 weights only; the prefill path): x and the intermediate h are quantized per (row, 128
    columns) (``fp8_linear.per_token_group_quant``: two more launches) and both grouped GEMMs run FP8 × FP8
    (the tensor cores on sm_89+, emulated in fp32 under the interpreter). Decode stays weight-only.

    M*top_k < E (decode): ``_moe_gate_up_decode_kernel`` then ``_moe_down_sum_kernel`` (top-k sum folded in):
    two launches, no alignment. Otherwise (prefill): ``moe_align`` (one launch), the grouped gate/up and down
    GEMMs, and the sum over k.
    """
    m, hidden = x.shape
    e, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n_assign = m * top_k
    w_gate, w_up = gate_up_proj[:, :inter], gate_up_proj[:, inter:]
    scaled = scales is not None
    if scaled:
        gi = triton.cdiv(inter, scale_block)
        gs, ds = scales
        sg, su, sd = _scale_args(gs[:, :gi], None), _scale_args(gs[:, gi:], None), _scale_args(ds, None)
    else:
        sg = su = _scale_args(None, w_gate)
        sd = _scale_args(None, down_proj)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)
    aligned = _aligned(x, w_gate, w_up, down_proj, h)
    common = dict(SCALE_B=scale_block, SCALED=scaled, ALIGNED=aligned)

    if n_assign < e:
        out = torch.empty((m, hidden), dtype=x.dtype, device=x.device)
        aligned = aligned and _aligned(out)
        common["ALIGNED"] = aligned
        bk = DECODE_BLOCK_K
        launch = dict(BLOCK_K=bk, num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES, **common)
        bn = decode_block_n(n_assign, inter)
        _moe_gate_up_decode_kernel[(n_assign, triton.cdiv(inter, bn))](
            x, w_gate, w_up, sg[0], su[0], h, ids, n_assign, top_k, inter, hidden,
            x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), *sg[1:],
            h.stride(0), h.stride(1), BLOCK_N=bn, EVEN_K=hidden % bk == 0, **launch)
        bn = decode_block_n(m, hidden)
        _moe_down_sum_kernel[(m, triton.cdiv(hidden, bn))](
            h, down_proj, sd[0], out, topk_weights, ids, n_assign, top_k, hidden, inter,
            h.stride(0), h.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2), *sd[1:],
            out.stride(0), out.stride(1), topk_weights.stride(0), topk_weights.stride(1),
            BLOCK_N=bn, EVEN_K=inter % bk == 0, **launch)
        return out

    if act_fp8 and not scaled:
        raise ValueError("act_fp8 needs block-FP8 expert weights (scales)")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sorted_ids, expert_ids, _ = moe_align(ids, e, bm)
    num_blocks = expert_ids.numel()
    out = torch.empty((n_assign, hidden), dtype=x.dtype, device=x.device)
    common["ALIGNED"] = aligned and _aligned(out)
    native, a, a_scale = False, x, None
    if act_fp8:
        from .fp8_linear import _has_fp8_dot, per_token_group_quant   # w8a8 only (kernel -> kernel import)

        native = x.is_cuda and _has_fp8_dot(x.device.index or 0)
        a, a_scale = per_token_group_quant(x, scale_block)
        common["ALIGNED"] = common["ALIGNED"] and _aligned(a)
    xs = _act_scale_args(a_scale, a)
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", ACT_FP8=act_fp8,
                  NATIVE_FP8_DOT=native, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    _moe_gate_up_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        a, w_gate, w_up, sg[0], su[0], xs[0], h, sorted_ids, expert_ids, n_assign, top_k, inter, hidden, num_blocks,
        a.stride(0), a.stride(1), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), *sg[1:], *xs[1:],
        h.stride(0), h.stride(1), EVEN_K=hidden % bk == 0, **launch)
    h_scale = None
    if act_fp8:
        h, h_scale = per_token_group_quant(h, scale_block)
        launch["ALIGNED"] = launch["ALIGNED"] and _aligned(h)
    hs = _act_scale_args(h_scale, h)
    _moe_down_kernel[(num_blocks * triton.cdiv(hidden, bn),)](
        h, down_proj, sd[0], hs[0], out, topk_weights, sorted_ids, expert_ids, n_assign, top_k, hidden, inter,
        num_blocks, h.stride(0), h.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2), *sd[1:],
        *hs[1:], out.stride(0), out.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        EVEN_K=inter % bk == 0, **launch)
    # deterministic: a fixed-order reduction, never float atomics
    return out.view(m, top_k, hidden).sum(dim=1)


# Token-expert assignments up to which the torch path gathers per-token expert weights instead of looping.
_STATIC_MAX_ASSIGNMENTS = 64


def fused_moe(x, gate_up_proj, down_proj, topk_weights, topk_ids, config=None):
    """Routed experts of a Qwen3-Omni sparse MoE block.

    x: (tokens, H); gate_up_proj: (E, 2I, H), gate rows first; down_proj: (E, H, I);
    topk_weights: (tokens, top_k) (from ``route``); topk_ids: (tokens, top_k) integer in [0, E).
    config: optional launch config dict for the grouped (prefill) GEMMs (keys ``BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_M, num_warps, num_stages``); default: ``get_config(tokens, dtype, device)``.
    Returns (tokens, H) in x's dtype. Any strides are accepted (x may be a slice of a larger tensor).
    """
    _check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    if use_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids):
        m, hidden = x.shape
        if m == 0:
            return x.new_zeros((0, hidden))
        return run_experts(x, gate_up_proj, down_proj, topk_weights, topk_ids, _resolve_config(config, m, x))
    # Few assignments (decode): gather each token's experts and run batched matmuls (graph-safe, no per-expert
    # loop); many (prefill): loop over experts, which reads each expert's weights once.
    if graph_safe_enabled() or topk_ids.numel() <= _STATIC_MAX_ASSIGNMENTS:
        return fused_moe_static(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    return fused_moe_ref(x, gate_up_proj, down_proj, topk_weights, topk_ids)


# --------------------------------------------------------------------------------------------------------
# References (CPU path and tests' truth)
# --------------------------------------------------------------------------------------------------------

def fused_moe_ref(x, gate_up_proj, down_proj, topk_weights, topk_ids):
    """Loop over experts, operation for operation as transformers' ``Qwen3OmniMoeThinkerTextExperts``.

    x: (tokens, H); gate_up_proj: (E, 2I, H); down_proj: (E, H, I); topk_*: (tokens, top_k).
    Returns (tokens, H) in x's dtype (accumulated in x's dtype, expert by expert, like ``index_add_``).
    """
    out = torch.zeros_like(x)
    num_experts = gate_up_proj.shape[0]
    for e in range(num_experts):
        token_idx, k_pos = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(x[token_idx], gate_up_proj[e]).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        y = torch.nn.functional.linear(h, down_proj[e]) * topk_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def fused_moe_static(x, gate_up_proj, down_proj, topk_weights, topk_ids):
    """Static-shape :func:`fused_moe` (traces with ``fullgraph=True``: no per-expert ``torch.where``): gathers
    each token's top-k experts' weights, (tokens, top_k, 2I, H) and (tokens, top_k, H, I), and runs them as
    batched matmuls — for the small decode batches it serves, not for prefill-sized ones.

    Shapes as :func:`fused_moe`; equals the reference up to the order of the top-k sum.
    """
    m, hidden = x.shape
    top_k = topk_ids.shape[1]
    if m == 0:
        return x.new_zeros((0, hidden))
    ids = topk_ids.long()
    w_gate_up = gate_up_proj[ids]                      # (m, top_k, 2I, H)
    w_down = down_proj[ids]                            # (m, top_k, H, I)
    xs = x[:, None, :, None].expand(m, top_k, hidden, 1)
    gate, up = torch.matmul(w_gate_up, xs).squeeze(-1).chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up            # (m, top_k, I)
    y = torch.matmul(w_down, h[..., None]).squeeze(-1) * topk_weights[..., None]
    return y.to(x.dtype).sum(dim=1)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every table config x dtype, at the released shapes' launch signature
# --------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INTS = ("num_assign", "top_k", "N", "K")


def gemm_signatures(act: str, weight: str, scale: str, grouped: bool,
                    act_fp8: bool = False) -> dict[str, tuple[dict, dict]]:
    """{kernel name: (signature, unit-stride constexprs)} of the expert GEMMs for the AOT specs: activations
    of Triton type ``act``, weights ``weight``, scale pointers ``scale``; ``grouped``: the prefill kernels
    (else the decode ones); ``act_fp8``: the grouped kernels' w8a8 form (x and h as FP8 codes with fp32
    per-group scales). Contiguous operands have unit inner strides; the runtime JIT specialises an int
    argument equal to 1 into a constant, so the specs do the same (the other strides stay i32). Shared with
    fused_moe_fp8's specs."""
    ints = _INTS + (("num_blocks",) if grouped else ())
    rows = {"sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32"} if grouped else {"ids_ptr": "*i64"}
    s_strides = {n: "i32" for n in ("stride_se", "stride_sn")}
    gu = {"x_ptr": f"*{act}", "wg_ptr": f"*{weight}", "wu_ptr": f"*{weight}", "sg_ptr": f"*{scale}",
          "su_ptr": f"*{scale}", "h_ptr": f"*{act}", **rows,
          **{n: "i32" for n in ints + ("stride_xm", "stride_we", "stride_wn")}, **s_strides, "stride_hm": "i32"}
    dn = {"h_ptr": f"*{act}", "w_ptr": f"*{weight}", "s_ptr": f"*{scale}", "out_ptr": f"*{act}",
          "topk_w_ptr": f"*{act}", **rows, **{n: "i32" for n in ints + ("stride_hm", "stride_we", "stride_wn")},
          **s_strides, "stride_om": "i32", "stride_tw_m": "i32"}
    unit_gu = {"stride_xk": 1, "stride_wk": 1, "stride_sk": 1, "stride_hn": 1}
    unit_dn = {"stride_hk": 1, "stride_wk": 1, "stride_sk": 1, "stride_on": 1, "stride_tw_k": 1}
    if grouped:
        fp8 = "fp8e4nv" if act_fp8 else act
        gu = dict(gu, x_ptr=f"*{fp8}", xs_ptr="*fp32", stride_xsm="i32")
        dn = dict(dn, h_ptr=f"*{fp8}", hs_ptr="*fp32", stride_hsm="i32")
        consts = {"ACT_FP8": act_fp8, "NATIVE_FP8_DOT": act_fp8}
        return {"gate_up": (_moe_gate_up_kernel, gu, dict(unit_gu, stride_xsk=1, **consts)),
                "down": (_moe_down_kernel, dn, dict(unit_dn, stride_hsk=1, **consts))}
    return {"gate_up_decode": (_moe_gate_up_decode_kernel, gu, unit_gu),
            "down_sum": (_moe_down_sum_kernel, dn, unit_dn)}


def decode_block_ns() -> list[int]:
    """Every N tile ``decode_block_n`` can choose."""
    out, bn = [], DECODE_MAX_BLOCK_N
    while bn >= DECODE_MIN_BLOCK_N:
        out.append(bn)
        bn //= 2
    return out


def _compile_specs() -> list[KernelSpec]:
    specs = []
    seen = set()
    for _, cfg_items in _load_table(None):
        for dtype, tname in _TRITON_DTYPE.items():
            cfg = fit_config(dict(cfg_items), dtype)
            key = (tuple(sorted(cfg.items())), tname)
            if key in seen:
                continue
            seen.add(key)
            # EVEN_K holds for both GEMMs at the released shapes (H = 2048/1024, I = 768/384).
            consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                      "GROUP_M": cfg["GROUP_M"], "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                      "SCALE_B": 128, "SCALED": False, "EVEN_K": True, "ALIGNED": True}
            tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}".format(**cfg)
            for name, (fn, sig, units) in gemm_signatures(tname, tname, tname, grouped=True).items():
                specs.append(KernelSpec(name=f"fused_moe_{name}_{tname}_{tag}", fn=fn, signature=sig,
                                        constexprs={**consts, **units}, num_warps=cfg["num_warps"],
                                        num_stages=cfg["num_stages"]))
    for tname in _TRITON_DTYPE.values():
        for bn in decode_block_ns():
            consts = {"BLOCK_N": bn, "BLOCK_K": DECODE_BLOCK_K, "SCALE_B": 128, "SCALED": False, "EVEN_K": True,
                      "ALIGNED": True}
            for name, (fn, sig, units) in gemm_signatures(tname, tname, tname, grouped=False).items():
                specs.append(KernelSpec(name=f"fused_moe_{name}_{tname}_n{bn}", fn=fn, signature=sig,
                                        constexprs={**consts, **units}, num_warps=DECODE_NUM_WARPS,
                                        num_stages=DECODE_NUM_STAGES))
    return specs


def _routing_specs() -> list[KernelSpec]:
    specs = []
    # thinker 128 experts top-8, talker 128 top-6 (+ its shared expert as 2 parts); the tiny/small fp32 models
    for tname, e, k, shared in (("bf16", 128, 8, 0), ("bf16", 128, 6, 0), ("bf16", 128, 6, 2), ("fp16", 128, 8, 0),
                                ("fp32", 8, 3, 0), ("fp32", 32, 4, 0), ("fp32", 8, 3, 2)):
        block_e = triton.next_power_of_2(e)
        specs.append(KernelSpec(
            name=f"route_{tname}_e{e}_k{k}_s{shared}", fn=_route_kernel,
            signature={"logits_ptr": f"*{tname}", "w_ptr": f"*{tname}", "ids_ptr": "*i64", "E": "i32",
                       "stride_l": "i32", "stride_w": "i32", "stride_i": "i32"},
            constexprs={"TOP_K": k, "NUM_SHARED": shared, "BLOCK_K": triton.next_power_of_2(k + shared),
                        "BLOCK_E": block_e, "NORM": True},
            num_warps=1 if block_e <= 256 else 4, num_stages=1))
    block_ms = sorted({dict(items)["BLOCK_M"] for _, items in _load_table(None)} | {16})
    for bm in block_ms:
        specs.append(KernelSpec(
            name=f"moe_align_e128_m{bm}", fn=_moe_align_kernel,
            signature={"ids_ptr": "*i64", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                       "total_ptr": "*i32", "n_assign": "i32", "num_blocks": "i32", "E": "i32"},
            constexprs={"BLOCK_E": 128, "BLOCK_A": _ALIGN_CHUNK, "BLOCK_M": bm}, num_warps=4, num_stages=1))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs() + _routing_specs()

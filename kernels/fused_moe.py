"""Fused mixture-of-experts FFN (Qwen3-Omni thinker and talker sparse MoE blocks).

Semantics follow transformers' ``Qwen3OmniMoeThinkerTextSparseMoeBlock`` / ``...TalkerTextSparseMoeBlock``
(modeling_qwen3_omni_moe.py, 5.23.0):

    logits  = x @ gate.T                                   # (tokens, E), x's dtype
    weights = softmax(logits, fp32) -> top-k -> /sum (norm_topk_prob) -> cast to logits' dtype
    out_e   = down_e(silu(gate_e(x)) * up_e(x))            # gate_up_proj[e] = [gate; up]: (2I, H)
    out     = sum_k weights_k * out_{e_k}
    talker: out += sigmoid(x @ shared_expert_gate.T) * down_s(silu(gate_s(x)) * up_s(x))

The Triton path is vLLM's fused-MoE scheme, trimmed:

1. ``moe_align``: the (token, k) assignments are sorted by expert and each expert's group is padded to a
   multiple of BLOCK_M, so every BLOCK_M-row block of the sorted list belongs to one expert. Pure torch
   device ops with a fixed output size (``M*top_k + E*(BLOCK_M-1)``): no host sync, CUDA-graph safe.
2. ``_moe_gate_up_kernel``: grouped GEMM over the blocks, gate and up tiles accumulated side by side and
   SiLU*mul applied in the epilogue -> ``h: (M*top_k, I)``.
3. ``_moe_down_kernel``: grouped GEMM ``h @ down_e.T`` with the row's routing weight applied in the
   epilogue -> ``(M*top_k, H)``.
4. The sum over k is a plain ``view(M, top_k, H).sum(1)``: deterministic, no float atomics.

The talker's shared expert reuses the same two kernels as a single expert (E=1, top_k=1) whose "routing
weight" is the sigmoid gate.

Launch configs (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) come from a JSON table keyed by the token
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
    "fused_moe", "fused_moe_ref", "fused_moe_static", "shared_expert_moe", "shared_expert_moe_ref", "route",
    "route_ref", "moe_align",
    "get_config", "DEFAULT_CONFIG", "COMPILE_SPECS",
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
# Routing and alignment (torch device ops, fixed shapes)
# --------------------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True):
    """Top-k routing as in transformers' ``Qwen3OmniMoe*TopKRouter``.

    router_logits: (tokens, E) in the activations' dtype. Returns ``(weights, ids)``: weights (tokens, top_k)
    in ``router_logits.dtype`` (softmax and renormalisation happen in fp32 first), ids (tokens, top_k) int64.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be (tokens, E), got {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, E={router_logits.shape[1]}]")
    if use_triton(router_logits):
        return _route_triton(router_logits, top_k, norm_topk_prob)
    return route_ref(router_logits, top_k, norm_topk_prob)


def route_ref(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True):
    """PyTorch :func:`route` (the CPU path and the tests' truth)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, sparse: bool | None = None):
    """Group the (token, k) assignments into blocks of ``block_m`` rows that each belong to one expert.

    Two layouts, both with shapes that depend only on (M, top_k, E, block_m):

    - dense (``sparse=False``): sorted by expert, each expert's group padded to a multiple of ``block_m``
      (prefill: every expert's weights are read once);
    - sparse (``sparse=True``; the default when M*top_k < E, i.e. decode): no sort — assignment j gets block j
      alone (row 0 = j, the rest padding). ``M*top_k`` blocks instead of ``cdiv(M*top_k + E*(block_m-1),
      block_m)``, so the GEMM grids hold only working programs; a token pair sharing an expert reads its
      weights twice, which few tokens (M*top_k < E) rarely do. One launch on the Triton path.

    topk_ids: (M, top_k) integer expert ids in [0, E). Returns, all on ``topk_ids.device``:

    - ``sorted_ids``: (num_blocks*block_m,) int32, flat assignment indices ``m*top_k + k`` (dense: grouped by
      expert, stable within an expert); padding slots hold the sentinel ``M*top_k``. Every block the GEMMs
      load is inside the tensor.
    - ``expert_ids``: (cdiv(len(sorted_ids), block_m),) int32, the expert of each block, -1 for blocks past
      the padded end (the GEMM kernels skip them).
    - ``num_post_pad``: (1,) int32, padded length actually used.

    The output size depends only on (M, top_k, E, block_m), never on the routing, and no value is read
    back to the host, so this can be captured in a CUDA graph / traced with ``fullgraph=True``.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (M, top_k), got {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    device = topk_ids.device
    n_assign = topk_ids.numel()
    if sparse is None:
        sparse = n_assign < num_experts
    if sparse:
        return _moe_align_sparse(topk_ids, block_m)
    max_padded = n_assign + num_experts * (block_m - 1)
    num_blocks = (max_padded + block_m - 1) // block_m

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
    # num_blocks * block_m entries (not max_padded): the last block's BLOCK_M-row load stays in bounds.
    sorted_ids = torch.full((num_blocks * block_m,), n_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))

    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    expert_ids = torch.searchsorted(pad_end, block_start, right=True)
    total = pad_end[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, torch.full_like(expert_ids, -1)).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)


def _moe_align_sparse(topk_ids: torch.Tensor, block_m: int):
    """The sparse layout of :func:`moe_align` (one block per assignment)."""
    n = topk_ids.numel()
    device = topk_ids.device
    if use_triton(topk_ids) and n > 0:
        sorted_ids = torch.empty(n * block_m, dtype=torch.int32, device=device)
        expert_ids = torch.empty(n, dtype=torch.int32, device=device)
        total = torch.empty(1, dtype=torch.int32, device=device)
        ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
        _moe_align_sparse_kernel[(n,)](ids, sorted_ids, expert_ids, total, n, BLOCK_M=block_m, num_warps=1)
        return sorted_ids, expert_ids, total
    sorted_ids = torch.full((n, block_m), n, dtype=torch.int32, device=device)
    sorted_ids[:, 0] = torch.arange(n, dtype=torch.int32, device=device)
    total = torch.full((1,), n * block_m, dtype=torch.int32, device=device)
    return sorted_ids.view(-1), topk_ids.reshape(-1).to(torch.int32), total


def _route_triton(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    m, e = router_logits.shape
    weights = torch.empty((m, top_k), dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty((m, top_k), dtype=torch.int64, device=router_logits.device)
    if m == 0:
        return weights, ids
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    block_e = triton.next_power_of_2(e)
    _route_kernel[(m,)](router_logits, weights, ids, e, router_logits.stride(0), weights.stride(0), ids.stride(0),
                        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e, NORM=norm_topk_prob,
                        num_warps=1 if block_e <= 256 else 4)
    return weights, ids


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, stride_w, stride_i,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, NORM: tl.constexpr):
    # One token: fp32 softmax over the experts, top-k by repeated argmax (lowest index first on ties), the
    # renormalisation in fp32, weights rounded to the logits' dtype. One launch for route()'s five ops.
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
    kmask = k_offs < TOP_K
    tl.store(ids_ptr + row * stride_i + k_offs, idxs.to(tl.int64), mask=kmask)
    tl.store(w_ptr + row * stride_w + k_offs, vals.to(w_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _moe_align_sparse_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, n_assign,
                             BLOCK_M: tl.constexpr):
    # Assignment j owns block j: row 0 is j, the other rows the sentinel n_assign.
    j = tl.program_id(0)
    if j == 0:
        tl.store(total_ptr, n_assign * BLOCK_M)
    tl.store(expert_ids_ptr + j, tl.load(ids_ptr + j).to(tl.int32))
    offs = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + j.to(tl.int64) * BLOCK_M + offs, tl.where(offs == 0, j, n_assign).to(tl.int32))


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
def _moe_gate_up_kernel(
    x_ptr,            # (M, K) activations
    wg_ptr,           # (E, N, K) gate half of gate_up_proj
    wu_ptr,           # (E, N, K) up half (same strides as the gate half)
    h_ptr,            # (M*top_k, N) output: silu(gate) * up
    sorted_ids_ptr,   # (num_blocks*BLOCK_M,) flat assignment ids, sentinel = num_assign
    expert_ids_ptr,   # (num_blocks,) expert per block, -1 = past the end
    num_assign, top_k, N, K, num_blocks,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_hm, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return

    # ---- rows of this block: assignment ids -> token rows of x
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ids_ptr + offs_m)
    row_mask = assign < num_assign
    token = (assign // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    # Weight tile offsets stay int32 (one expert is < 2**31 elements); only the expert base is int64.
    x_rows = x_ptr + token[:, None] * stride_xm
    w_offs = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    wg_base = wg_ptr + expert.to(tl.int64) * stride_we
    wu_base = wu_ptr + expert.to(tl.int64) * stride_we

    # ---- main loop: gate and up share the A tile
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a_p = x_rows + (k0 + offs_k)[None, :] * stride_xk
        g_p = wg_base + (w_offs + k0 * stride_wk)
        u_p = wu_base + (w_offs + k0 * stride_wk)
        if ALIGNED:
            # 16-byte aligned rows let loads vectorise (and use cp.async) even when compiled ahead of time
            # without the runtime's pointer-alignment specialisation.
            a_p = tl.multiple_of(a_p, [16, 16])
            g_p = tl.multiple_of(g_p, [16, 16])
            u_p = tl.multiple_of(u_p, [16, 16])
        if EVEN_K:
            a = tl.load(a_p, mask=row_mask[:, None], other=0.0)
            g = tl.load(g_p, mask=n_mask[None, :], other=0.0)
            u = tl.load(u_p, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_p, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_p, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            u = tl.load(u_p, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)

    # ---- epilogue: round where the reference rounds (linear outputs, silu output, product) so 16-bit
    # results track transformers' eager module, not a higher-precision variant of it.
    out_ty = h_ptr.dtype.element_ty
    gate = acc_g.to(out_ty).to(tl.float32)
    up = acc_u.to(out_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    h = (act * up).to(out_ty)
    h_ptrs = h_ptr + assign.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr,            # (M*top_k, K) intermediate, indexed by assignment id
    w_ptr,            # (E, N, K) down_proj
    out_ptr,          # (M*top_k, N) weighted expert outputs, indexed by assignment id
    topk_w_ptr,       # (M, top_k) routing weights
    sorted_ids_ptr, expert_ids_ptr,
    num_assign, top_k, N, K, num_blocks,
    stride_hm, stride_hk,
    stride_we, stride_wn, stride_wk,
    stride_om, stride_on,
    stride_tw_m, stride_tw_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ids_ptr + offs_m)
    row_mask = assign < num_assign
    assign64 = assign.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    h_rows = h_ptr + assign64[:, None] * stride_hm
    w_offs = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a_p = h_rows + (k0 + offs_k)[None, :] * stride_hk
        w_p = w_base + (w_offs + k0 * stride_wk)
        if ALIGNED:
            a_p = tl.multiple_of(a_p, [16, 16])
            w_p = tl.multiple_of(w_p, [16, 16])
        if EVEN_K:
            a = tl.load(a_p, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_p, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_p, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_p, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # ---- epilogue: reference computes linear (rounded) * weight, then rounds the product
    out_ty = out_ptr.dtype.element_ty
    rw = tl.load(topk_w_ptr + (assign // top_k) * stride_tw_m + (assign % top_k) * stride_tw_k,
                 mask=row_mask, other=0.0).to(tl.float32)
    out = (acc.to(out_ty).to(tl.float32) * rw[:, None]).to(out_ty)
    o_ptrs = out_ptr + assign64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out, mask=row_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids):
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
    if x.dtype not in _DTYPES or gate_up_proj.dtype != x.dtype or down_proj.dtype != x.dtype:
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


def _run_experts(x, w_gate, w_up, down_proj, topk_weights, topk_ids, cfg):
    """Launch both grouped GEMMs; returns (M*top_k, H) weighted per-assignment outputs."""
    m, hidden = x.shape
    e, inter, _ = w_gate.shape
    top_k = topk_ids.shape[1]
    n_assign = m * top_k
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sorted_ids, expert_ids, _ = moe_align(topk_ids, e, bm)
    num_blocks = expert_ids.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], DOT_PRECISION=precision,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((n_assign, hidden), dtype=x.dtype, device=x.device)
    aligned = _aligned(x, w_gate, w_up, down_proj, h, out)
    grid = (num_blocks * triton.cdiv(inter, bn),)
    _moe_gate_up_kernel[grid](
        x, w_gate, w_up, h, sorted_ids, expert_ids,
        n_assign, top_k, inter, hidden, num_blocks,
        x.stride(0), x.stride(1),
        w_gate.stride(0), w_gate.stride(1), w_gate.stride(2),
        h.stride(0), h.stride(1), EVEN_K=hidden % bk == 0, ALIGNED=aligned, **launch)

    grid = (num_blocks * triton.cdiv(hidden, bn),)
    _moe_down_kernel[grid](
        h, down_proj, out, topk_weights, sorted_ids, expert_ids,
        n_assign, top_k, hidden, inter, num_blocks,
        h.stride(0), h.stride(1),
        down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        out.stride(0), out.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), EVEN_K=inter % bk == 0, ALIGNED=aligned, **launch)
    return out


def _fused_moe_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids, config=None):
    m, hidden = x.shape
    top_k = topk_ids.shape[1]
    if m == 0:
        return x.new_zeros((0, hidden))
    cfg = _resolve_config(config, m, x)
    inter = gate_up_proj.shape[1] // 2
    out = _run_experts(x, gate_up_proj[:, :inter], gate_up_proj[:, inter:], down_proj, topk_weights,
                       topk_ids, cfg)
    return out.view(m, top_k, hidden).sum(dim=1)


# Token-expert assignments up to which the torch path gathers per-token expert weights instead of looping.
_STATIC_MAX_ASSIGNMENTS = 64


def fused_moe(x, gate_up_proj, down_proj, topk_weights, topk_ids, config=None):
    """Routed experts of a Qwen3-Omni sparse MoE block.

    x: (tokens, H); gate_up_proj: (E, 2I, H), gate rows first; down_proj: (E, H, I);
    topk_weights: (tokens, top_k) (from ``route``); topk_ids: (tokens, top_k) integer in [0, E).
    config: optional launch config dict (keys ``BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages``); default: ``get_config(tokens, dtype, device)``.
    Returns (tokens, H) in x's dtype. Any strides are accepted (x may be a slice of a larger tensor).
    """
    _check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    if use_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids):
        return _fused_moe_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids, config)
    # Few assignments (decode): gather each token's experts and run batched matmuls (graph-safe, no per-expert
    # loop); many (prefill): loop over experts, which reads each expert's weights once.
    if graph_safe_enabled() or topk_ids.numel() <= _STATIC_MAX_ASSIGNMENTS:
        return fused_moe_static(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    return fused_moe_ref(x, gate_up_proj, down_proj, topk_weights, topk_ids)


def _check_shared(x, gate_proj, up_proj, down_proj, shared_expert_gate):
    hidden = x.shape[1]
    inter = gate_proj.shape[0] if gate_proj.dim() == 2 else -1
    want = {"shared_gate_proj": (gate_proj, (inter, hidden)), "shared_up_proj": (up_proj, (inter, hidden)),
            "shared_down_proj": (down_proj, (hidden, inter)), "shared_expert_gate": (shared_expert_gate, (1, hidden))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must match x ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")
    if gate_proj.stride() != up_proj.stride():
        raise ValueError("shared_gate_proj and shared_up_proj must have the same strides")


def shared_expert_moe(x, gate_up_proj, down_proj, topk_weights, topk_ids, shared_gate_proj, shared_up_proj,
                      shared_down_proj, shared_expert_gate, config=None):
    """Talker MoE: routed experts (as ``fused_moe``) plus the sigmoid-gated shared expert.

    shared_gate_proj, shared_up_proj: (Is, H); shared_down_proj: (H, Is); shared_expert_gate: (1, H)
    (the ``nn.Linear(H, 1)`` weight). Returns (tokens, H) in x's dtype.
    """
    _check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    _check_shared(x, shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate)
    tensors = (x, gate_up_proj, down_proj, topk_weights, topk_ids, shared_gate_proj, shared_up_proj,
               shared_down_proj, shared_expert_gate)
    if not use_triton(*tensors):
        if graph_safe_enabled():
            f = torch.nn.functional
            shared = f.linear(f.silu(f.linear(x, shared_gate_proj)) * f.linear(x, shared_up_proj), shared_down_proj)
            routed = fused_moe_static(x, gate_up_proj, down_proj, topk_weights, topk_ids)
            return routed + torch.sigmoid(f.linear(x, shared_expert_gate)) * shared
        return shared_expert_moe_ref(*tensors)
    m, hidden = x.shape
    if m == 0:
        return x.new_zeros((0, hidden))
    routed = _fused_moe_triton(x, gate_up_proj, down_proj, topk_weights, topk_ids, config)
    cfg = _resolve_config(config, m, x)
    # The shared expert is one more expert (E=1, top_k=1) whose routing weight is the sigmoid gate.
    gate = torch.sigmoid(x @ shared_expert_gate.t())
    ids = torch.zeros((m, 1), dtype=torch.int32, device=x.device)
    shared = _run_experts(x, shared_gate_proj.unsqueeze(0), shared_up_proj.unsqueeze(0),
                          shared_down_proj.unsqueeze(0), gate, ids, cfg)
    return routed + shared


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


def shared_expert_moe_ref(x, gate_up_proj, down_proj, topk_weights, topk_ids, shared_gate_proj, shared_up_proj,
                          shared_down_proj, shared_expert_gate):
    """Talker MoE as transformers' ``Qwen3OmniMoeTalkerTextSparseMoeBlock`` (routing weights given)."""
    f = torch.nn.functional
    shared = f.linear(f.silu(f.linear(x, shared_gate_proj)) * f.linear(x, shared_up_proj), shared_down_proj)
    routed = fused_moe_ref(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    return routed + torch.sigmoid(f.linear(x, shared_expert_gate)) * shared


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every table config x dtype, at the released shapes' launch signature
# --------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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
            consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                      "GROUP_M": cfg["GROUP_M"], "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                      "ALIGNED": True}
            tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}".format(**cfg)
            # Contiguous operands have unit inner strides; the runtime JIT specialises an int argument equal to
            # 1 into a constant, so the specs do the same (and leave the other strides as i32).
            ints = ("num_assign", "top_k", "N", "K", "num_blocks")
            sig_gu = {"x_ptr": f"*{tname}", "wg_ptr": f"*{tname}", "wu_ptr": f"*{tname}", "h_ptr": f"*{tname}",
                      "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                      **{n: "i32" for n in ints + ("stride_xm", "stride_we", "stride_wn", "stride_hm")}}
            sig_dn = {"h_ptr": f"*{tname}", "w_ptr": f"*{tname}", "out_ptr": f"*{tname}",
                      "topk_w_ptr": f"*{tname}", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                      **{n: "i32" for n in ints + ("stride_hm", "stride_we", "stride_wn", "stride_om",
                                                   "stride_tw_m")}}
            # EVEN_K holds for both GEMMs at the released shapes (H = 2048/1024, I = 768/384, shared 768).
            unit_gu = {"stride_xk": 1, "stride_wk": 1, "stride_hn": 1, "EVEN_K": True}
            unit_dn = {"stride_hk": 1, "stride_wk": 1, "stride_on": 1, "stride_tw_k": 1, "EVEN_K": True}
            for name, fn, sig, units in (("gate_up", _moe_gate_up_kernel, sig_gu, unit_gu),
                                         ("down", _moe_down_kernel, sig_dn, unit_dn)):
                specs.append(KernelSpec(name=f"fused_moe_{name}_{tname}_{tag}", fn=fn, signature=sig,
                                        constexprs={**consts, **units}, num_warps=cfg["num_warps"],
                                        num_stages=cfg["num_stages"]))
    return specs


def _routing_specs() -> list[KernelSpec]:
    specs = []
    # thinker 128 experts top-8, talker 128 top-6 (bf16 logits); the tiny/small fp32 test models
    for tname, e, k in (("bf16", 128, 8), ("bf16", 128, 6), ("fp16", 128, 8), ("fp32", 8, 3), ("fp32", 32, 4)):
        block_e = triton.next_power_of_2(e)
        specs.append(KernelSpec(
            name=f"route_{tname}_e{e}_k{k}", fn=_route_kernel,
            signature={"logits_ptr": f"*{tname}", "w_ptr": f"*{tname}", "ids_ptr": "*i64", "E": "i32",
                       "stride_l": "i32", "stride_w": "i32", "stride_i": "i32"},
            constexprs={"TOP_K": k, "BLOCK_K": triton.next_power_of_2(k), "BLOCK_E": block_e, "NORM": True},
            num_warps=1 if block_e <= 256 else 4, num_stages=1))
    for bm in sorted({cfg["BLOCK_M"] for _, items in _load_table(None) for cfg in [dict(items)]} | {16}):
        specs.append(KernelSpec(
            name=f"moe_align_sparse_m{bm}", fn=_moe_align_sparse_kernel,
            signature={"ids_ptr": "*i64", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "total_ptr": "*i32",
                       "n_assign": "i32"},
            constexprs={"BLOCK_M": bm}, num_warps=1, num_stages=1))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs() + _routing_specs()

"""Fused mixture-of-experts FFN with block-FP8 expert weights (weight-only: activations stay bf16/fp16/fp32).

Same scheme and semantics as ``fused_moe`` (its ``moe_align``, launch-config table and epilogue rounding are
reused), with the expert stacks stored as float8_e4m3fn codes plus fp32 block scales (``omni_rt.quant``):

- ``gate_up_proj``: (E, 2I, H) codes, ``gate_up_scale``: (E, 2·ceil(I/128), ceil(H/128)) — the gate part's
  grid rows first, then the up part's (each part on its own 128-row grid, so I need not be a multiple of 128);
- ``down_proj``: (E, H, I) codes, ``down_scale``: (E, ceil(H/128), ceil(I/128)).

Each weight tile is dequantized inside the K loop (``code · scale[n // 128, k0 // 128]``, rounded to the
activation dtype — what dequantize-then-matmul computes) and fed to the usual 16-bit dot, so decode reads one
byte per weight. BLOCK_K divides 128: a K tile never straddles a scale column. Kept in its own file so the
bf16 kernels of ``fused_moe`` can change without touching the FP8 ones.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import KernelSpec, graph_safe_enabled, use_triton
from . import fused_moe as _moe
from .fused_moe import _grouped_pid

__all__ = ["fused_moe_fp8", "fused_moe_fp8_ref", "dequantize_experts", "COMPILE_SPECS"]

SCALE_BLOCK = 128


@triton.jit
def _moe_fp8_gate_up_kernel(
    x_ptr,            # (M, K) activations
    wg_ptr, wu_ptr,   # (E, N, K) FP8 codes of the gate / up halves (same strides)
    sg_ptr, su_ptr,   # (E, ceil(N/128), ceil(K/128)) fp32 scales of the gate / up halves (same strides)
    h_ptr,            # (M*top_k, N) output: silu(gate) * up
    sorted_ids_ptr, expert_ids_ptr,
    num_assign, top_k, N, K, num_blocks,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_hm, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ids_ptr + offs_m)
    row_mask = assign < num_assign
    token = (assign // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + token[:, None] * stride_xm
    w_offs = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    wg_base = wg_ptr + expert.to(tl.int64) * stride_we
    wu_base = wu_ptr + expert.to(tl.int64) * stride_we
    s_offs = expert.to(tl.int64) * stride_se + (offs_n // SCALE_B) * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a_p = x_rows + (k0 + offs_k)[None, :] * stride_xk
        if EVEN_K:
            a = tl.load(a_p, mask=row_mask[:, None], other=0.0)
            g = tl.load(wg_base + (w_offs + k0 * stride_wk), mask=n_mask[None, :], other=0.0)
            u = tl.load(wu_base + (w_offs + k0 * stride_wk), mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_p, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(wg_base + (w_offs + k0 * stride_wk), mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            u = tl.load(wu_base + (w_offs + k0 * stride_wk), mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        s_col = (k0 // SCALE_B) * stride_sk
        sg = tl.load(sg_ptr + s_offs + s_col, mask=n_mask, other=0.0)
        su = tl.load(su_ptr + s_offs + s_col, mask=n_mask, other=0.0)
        g = (g.to(tl.float32) * sg[None, :]).to(a.dtype)
        u = (u.to(tl.float32) * su[None, :]).to(a.dtype)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)

    # Epilogue as fused_moe's: round where the reference rounds.
    out_ty = h_ptr.dtype.element_ty
    gate = acc_g.to(out_ty).to(tl.float32)
    up = acc_u.to(out_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
    h = (act * up).to(out_ty)
    h_ptrs = h_ptr + assign.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_fp8_down_kernel(
    h_ptr,            # (M*top_k, K) intermediate, by assignment id
    w_ptr,            # (E, N, K) FP8 codes of down_proj
    s_ptr,            # (E, ceil(N/128), ceil(K/128)) fp32 scales
    out_ptr,          # (M*top_k, N) weighted expert outputs, by assignment id
    topk_w_ptr,       # (M, top_k) routing weights
    sorted_ids_ptr, expert_ids_ptr,
    num_assign, top_k, N, K, num_blocks,
    stride_hm, stride_hk,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_om, stride_on,
    stride_tw_m, stride_tw_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
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
    s_offs = expert.to(tl.int64) * stride_se + (offs_n // SCALE_B) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        a_p = h_rows + (k0 + offs_k)[None, :] * stride_hk
        if EVEN_K:
            a = tl.load(a_p, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_base + (w_offs + k0 * stride_wk), mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_p, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + (w_offs + k0 * stride_wk), mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.load(s_ptr + s_offs + (k0 // SCALE_B) * stride_sk, mask=n_mask, other=0.0)
        w = (w.to(tl.float32) * s[None, :]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    out_ty = out_ptr.dtype.element_ty
    rw = tl.load(topk_w_ptr + (assign // top_k) * stride_tw_m + (assign % top_k) * stride_tw_k,
                 mask=row_mask, other=0.0).to(tl.float32)
    out = (acc.to(out_ty).to(tl.float32) * rw[:, None]).to(out_ty)
    o_ptrs = out_ptr + assign64[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, out, mask=row_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------

def _check_fp8(x, gate_up_proj, down_proj, gate_up_scale, down_scale):
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn codes, got {t.dtype}")
    e, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2
    gi, gh = math.ceil(inter / SCALE_BLOCK), math.ceil(hidden / SCALE_BLOCK)
    for name, t, want in (("gate_up_scale", gate_up_scale, (e, 2 * gi, gh)), ("down_scale", down_scale, (e, gh, gi))):
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {want}, got {t.dtype} {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {t.device}")


def fit_fp8(cfg: dict) -> dict:
    """A bf16 table entry adapted to FP8 weights: BLOCK_K divides 128 (one scale column per K tile), and the
    gate/up kernel's two dequantized weight tiles get 8 warps and BLOCK_N <= 64 (spill-free on sm_90)."""
    cfg = dict(cfg)
    if SCALE_BLOCK % cfg["BLOCK_K"]:
        cfg["BLOCK_K"] = SCALE_BLOCK
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 64)
    cfg["num_warps"] = max(cfg["num_warps"], 8)
    return cfg


def _fp8_config(config, m, x):
    if config is not None:
        cfg = dict(_moe._resolve_config(config, m, x))
        if SCALE_BLOCK % cfg["BLOCK_K"]:
            raise ValueError(f"BLOCK_K must divide {SCALE_BLOCK} for FP8 weights, got {cfg['BLOCK_K']}")
        return cfg
    return fit_fp8(_moe._resolve_config(None, m, x))


def fused_moe_fp8(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids, config=None):
    """Routed experts with block-FP8 weights. x: (tokens, H) bf16/fp16/fp32; gate_up_proj (E, 2I, H) and
    down_proj (E, H, I) float8_e4m3fn; scales as the module docstring; topk_*: (tokens, top_k) from
    ``fused_moe.route``. Returns (tokens, H) in x's dtype. Without CUDA (and unforced): the reference."""
    _check_shapes(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    _check_fp8(x, gate_up_proj, down_proj, gate_up_scale, down_scale)
    if not use_triton(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids):
        return fused_moe_fp8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids)
    m, hidden = x.shape
    if m == 0:
        return x.new_zeros((0, hidden))
    e, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    gi = math.ceil(inter / SCALE_BLOCK)
    top_k = topk_ids.shape[1]
    n_assign = m * top_k
    cfg = _fp8_config(config, m, x)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sorted_ids, expert_ids, _ = _moe.moe_align(topk_ids, e, bm)
    num_blocks = expert_ids.numel()
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SCALE_B=SCALE_BLOCK,
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    wg, wu = gate_up_proj[:, :inter], gate_up_proj[:, inter:]
    sg, su = gate_up_scale[:, :gi], gate_up_scale[:, gi:]
    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((n_assign, hidden), dtype=x.dtype, device=x.device)
    _moe_fp8_gate_up_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        x, wg, wu, sg, su, h, sorted_ids, expert_ids, n_assign, top_k, inter, hidden, num_blocks,
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wg.stride(2),
        sg.stride(0), sg.stride(1), sg.stride(2), h.stride(0), h.stride(1), EVEN_K=hidden % bk == 0, **launch)
    _moe_fp8_down_kernel[(num_blocks * triton.cdiv(hidden, bn),)](
        h, down_proj, down_scale, out, topk_weights, sorted_ids, expert_ids, n_assign, top_k, hidden, inter,
        num_blocks, h.stride(0), h.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        down_scale.stride(0), down_scale.stride(1), down_scale.stride(2), out.stride(0), out.stride(1),
        topk_weights.stride(0), topk_weights.stride(1), EVEN_K=inter % bk == 0, **launch)
    return out.view(m, top_k, hidden).sum(dim=1)


def _check_shapes(x, gate_up_proj, down_proj, topk_weights, topk_ids):
    """fused_moe's shape/device checks, run on meta stand-ins of the codes in x's dtype."""
    def stand_in(t):
        return torch.empty(t.shape, dtype=x.dtype, device="meta").as_strided(t.shape, t.stride())

    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"x must be (tokens, H), gate_up_proj (E, 2I, H), down_proj (E, H, I); got "
                         f"{tuple(x.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    devices = {t.device for t in (x, gate_up_proj, down_proj, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    xm = torch.empty(x.shape, dtype=x.dtype, device="meta")
    _moe._check_inputs(xm, stand_in(gate_up_proj), stand_in(down_proj),
                       torch.empty(topk_weights.shape, dtype=topk_weights.dtype, device="meta"),
                       torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device="meta"))


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------

def dequantize_experts(gate_up_proj, down_proj, gate_up_scale, down_scale, dtype):
    """FP8 expert stacks → (gate_up (E, 2I, H), down (E, H, I)) in ``dtype`` (parts on their own grids)."""
    e, two_i, hidden = gate_up_proj.shape
    inter = two_i // 2

    def expand(scale, rows_parts, cols):
        row_map = torch.cat([base + torch.arange(p, device=scale.device) // SCALE_BLOCK
                             for base, p in rows_parts])
        col_map = torch.arange(cols, device=scale.device) // SCALE_BLOCK
        return scale.index_select(1, row_map).index_select(2, col_map)

    gi = math.ceil(inter / SCALE_BLOCK)
    gu = (gate_up_proj.float() * expand(gate_up_scale, ((0, inter), (gi, inter)), hidden)).to(dtype)
    dn = (down_proj.float() * expand(down_scale, ((0, hidden),), inter)).to(dtype)
    return gu, dn


def fused_moe_fp8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids):
    """Dequantize to x's dtype, then ``fused_moe``'s torch path (the reference, or its static-shape variant
    inside ``graph_safe``). Shapes as ``fused_moe_fp8``."""
    gu, dn = dequantize_experts(gate_up_proj, down_proj, gate_up_scale, down_scale, x.dtype)
    if graph_safe_enabled():
        return _moe.fused_moe_static(x, gu, dn, topk_weights, topk_ids)
    return _moe.fused_moe_ref(x, gu, dn, topk_weights, topk_ids)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (sm_90: sm_80 dequantizes at load and never runs these)
# --------------------------------------------------------------------------------------------------------

def _compile_specs() -> list[KernelSpec]:
    specs, seen = [], set()
    for _, cfg_items in _moe._load_table(None):
        cfg = fit_fp8(_moe.fit_config(dict(cfg_items), torch.bfloat16))
        key = tuple(sorted(cfg.items()))
        if key in seen:
            continue
        seen.add(key)
        consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                  "GROUP_M": cfg["GROUP_M"], "SCALE_B": SCALE_BLOCK, "DOT_PRECISION": "tf32", "EVEN_K": True}
        tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}".format(**cfg)
        ints = ("num_assign", "top_k", "N", "K", "num_blocks")
        sig_gu = {"x_ptr": "*bf16", "wg_ptr": "*fp8e4nv", "wu_ptr": "*fp8e4nv", "sg_ptr": "*fp32", "su_ptr": "*fp32",
                  "h_ptr": "*bf16", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                  **{n: "i32" for n in ints + ("stride_xm", "stride_we", "stride_wn", "stride_se", "stride_sn",
                                               "stride_hm")}}
        sig_dn = {"h_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", "topk_w_ptr": "*bf16",
                  "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                  **{n: "i32" for n in ints + ("stride_hm", "stride_we", "stride_wn", "stride_se", "stride_sn",
                                               "stride_om", "stride_tw_m")}}
        unit_gu = {"stride_xk": 1, "stride_wk": 1, "stride_sk": 1, "stride_hn": 1}
        unit_dn = {"stride_hk": 1, "stride_wk": 1, "stride_sk": 1, "stride_on": 1, "stride_tw_k": 1}
        for name, fn, sig, units in (("gate_up", _moe_fp8_gate_up_kernel, sig_gu, unit_gu),
                                     ("down", _moe_fp8_down_kernel, sig_dn, unit_dn)):
            specs.append(KernelSpec(name=f"fused_moe_fp8_{name}_bf16_{tag}", fn=fn, signature=sig,
                                    constexprs={**consts, **units}, num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"], archs=("sm_90",)))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs()

"""Fused mixture-of-experts FFN with block-FP8 expert weights (weight-only: activations stay bf16/fp16/fp32;
optionally w8a8 on the prefill path).

Same kernels, scheme and semantics as ``fused_moe`` (its routing, ``moe_align``, launch-config table and
epilogue rounding; the GEMM kernels run with ``SCALED=True``); this file holds only what FP8 adds: the
launcher's format checks and config fitting, the dequantizing reference, and the sm_90 compile specs. The
expert stacks are float8_e4m3fn codes plus fp32 block scales (``omni_rt.quant``):

- ``gate_up_proj``: (E, 2I, H) codes, ``gate_up_scale``: (E, 2·ceil(I/128), ceil(H/128)) — the gate part's
  grid rows first, then the up part's (each part on its own 128-row grid, so I need not be a multiple of 128);
- ``down_proj``: (E, H, I) codes, ``down_scale``: (E, ceil(H/128), ceil(I/128)).

Each weight tile is dequantized inside the K loop (``code · scale[n // 128, k0 // 128]``, rounded to the
activation dtype — what dequantize-then-matmul computes) and fed to the usual 16-bit dot (or GEMV at decode),
so decode reads one byte per weight. BLOCK_K divides 128: a K tile never straddles a scale column.

``act_fp8=True`` (w8a8, for prefill on FP8 tensor cores): where the grouped GEMMs run (M·top_k >= E), x and
the SwiGLU output h are quantized per (row, 128 columns) with scale = group amax / 448 (as ``fp8_linear``), both
GEMMs multiply FP8 codes, and each K tile's fp32 product is scaled by act_scale[row] · w_scale[n]. Decode-sized
calls stay weight-only. Its reference computes the same in fp32 on the dequantized operands.
"""
from __future__ import annotations

import math

import torch

from . import KernelSpec, graph_safe_enabled, use_triton
from . import fused_moe as _moe

__all__ = ["fused_moe_fp8", "fused_moe_fp8_ref", "dequantize_experts", "COMPILE_SPECS"]

SCALE_BLOCK = 128


# --------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------

def _check_codes(gate_up_proj, down_proj):
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn codes, got {t.dtype}")


def _check_scales(x, gate_up_proj, gate_up_scale, down_scale):
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


def fused_moe_fp8(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids, config=None,
                  act_fp8: bool = False):
    """Routed experts with block-FP8 weights. x: (tokens, H) bf16/fp16/fp32; gate_up_proj (E, 2I, H) and
    down_proj (E, H, I) float8_e4m3fn; scales as the module docstring; topk_*: (tokens, top_k) from
    ``fused_moe.route``; act_fp8: w8a8 where the grouped GEMMs run (see the module docstring). Returns
    (tokens, H) in x's dtype. Without CUDA (and unforced): the reference."""
    _check_codes(gate_up_proj, down_proj)
    _moe._check_inputs(x, gate_up_proj, down_proj, topk_weights, topk_ids, weight_dtype=torch.float8_e4m3fn)
    _check_scales(x, gate_up_proj, gate_up_scale, down_scale)
    w8a8 = _w8a8(act_fp8, x, gate_up_proj, topk_ids)
    if not use_triton(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids):
        return fused_moe_fp8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids,
                                 act_fp8=w8a8)
    m, hidden = x.shape
    if m == 0:
        return x.new_zeros((0, hidden))
    return _moe.run_experts(x, gate_up_proj, down_proj, topk_weights, topk_ids, _fp8_config(config, m, x),
                            scales=(gate_up_scale, down_scale), scale_block=SCALE_BLOCK, act_fp8=w8a8)


def _w8a8(act_fp8: bool, x, gate_up_proj, topk_ids) -> bool:
    """w8a8 applies to the grouped (prefill) GEMMs only: M·top_k >= E; decode-sized calls stay weight-only."""
    return bool(act_fp8) and x.shape[0] > 0 and x.shape[0] * topk_ids.shape[1] >= gate_up_proj.shape[0]


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


def fused_moe_fp8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids,
                      act_fp8: bool = False):
    """Dequantize to x's dtype, then ``fused_moe``'s torch path (the reference, or its static-shape variant
    inside ``graph_safe``). ``act_fp8`` (applied as ``fused_moe_fp8`` does): the w8a8 reference. Shapes as
    ``fused_moe_fp8``."""
    if _w8a8(act_fp8, x, gate_up_proj, topk_ids):
        return _w8a8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids)
    gu, dn = dequantize_experts(gate_up_proj, down_proj, gate_up_scale, down_scale, x.dtype)
    if graph_safe_enabled():
        return _moe.fused_moe_static(x, gu, dn, topk_weights, topk_ids)
    return _moe.fused_moe_ref(x, gu, dn, topk_weights, topk_ids)


def _group_dequant(t: torch.Tensor) -> torch.Tensor:
    """t (rows, K) -> its per-(row, 128 columns) FP8 quantization, dequantized to fp32 (what w8a8 multiplies)."""
    from .fp8_linear import per_token_group_quant_ref

    q, s = per_token_group_quant_ref(t, SCALE_BLOCK)
    return q.float() * s.repeat_interleave(SCALE_BLOCK, dim=1)[:, : t.shape[1]]


def _w8a8_ref(x, gate_up_proj, down_proj, gate_up_scale, down_scale, topk_weights, topk_ids):
    """w8a8 in fp32 on dequantized operands, rounding where the kernels round: the gate/up products, the
    SwiGLU (as ``fused_moe``'s epilogue), the re-quantized h, the down product times its routing weight, then
    the sum over top-k in x's dtype."""
    dt = x.dtype
    gu, dn = dequantize_experts(gate_up_proj, down_proj, gate_up_scale, down_scale, torch.float32)
    inter = gu.shape[1] // 2
    m, top_k = topk_ids.shape
    xd = _group_dequant(x)
    token = torch.arange(m, device=x.device).repeat_interleave(top_k)
    expert = topk_ids.reshape(-1)
    h = torch.empty((m * top_k, inter), dtype=dt, device=x.device)
    for e in expert.unique().tolist():   # a reference: a loop over the experts in use is fine
        rows = (expert == e).nonzero().flatten()
        a = xd[token[rows]]
        gate = (a @ gu[e, :inter].t()).to(dt).float()
        up = (a @ gu[e, inter:].t()).to(dt).float()
        act = (gate / (1.0 + torch.exp(-gate))).to(dt).float()
        h[rows] = (act * up).to(dt)
    hd = _group_dequant(h)
    out = torch.empty((m * top_k, x.shape[1]), dtype=dt, device=x.device)
    w = topk_weights.reshape(-1).float()
    for e in expert.unique().tolist():
        rows = (expert == e).nonzero().flatten()
        o = (hd[rows] @ dn[e].t()).to(dt).float()
        out[rows] = (o * w[rows, None]).to(dt)
    return out.view(m, top_k, -1).sum(dim=1)


# --------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (sm_90: sm_80 dequantizes at load and never runs these)
# --------------------------------------------------------------------------------------------------------

def _compile_specs() -> list[KernelSpec]:
    specs, seen = [], set()
    common = {"SCALE_B": SCALE_BLOCK, "SCALED": True, "EVEN_K": True, "ALIGNED": True}
    for _, cfg_items in _moe._load_table(None):
        cfg = fit_fp8(_moe.fit_config(dict(cfg_items), torch.bfloat16))
        key = tuple(sorted(cfg.items()))
        if key in seen:
            continue
        seen.add(key)
        consts = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                  "GROUP_M": cfg["GROUP_M"], "DOT_PRECISION": "tf32", **common}
        tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}".format(**cfg)
        for name, (fn, sig, units) in _moe.gemm_signatures("bf16", "fp8e4nv", "fp32", grouped=True).items():
            specs.append(KernelSpec(name=f"fused_moe_fp8_{name}_bf16_{tag}", fn=fn, signature=sig,
                                    constexprs={**consts, **units}, num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"], archs=("sm_90",)))
        # w8a8 (prefill): the same grouped tiles on FP8 x FP8 dots
        for name, (fn, sig, units) in _moe.gemm_signatures("bf16", "fp8e4nv", "fp32", grouped=True,
                                                            act_fp8=True).items():
            specs.append(KernelSpec(name=f"fused_moe_fp8_w8a8_{name}_bf16_{tag}", fn=fn, signature=sig,
                                    constexprs={**consts, **units}, num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"], archs=("sm_90",)))
    for bn in _moe.decode_block_ns():
        consts = {"BLOCK_N": bn, "BLOCK_K": _moe.DECODE_BLOCK_K, **common}
        for name, (fn, sig, units) in _moe.gemm_signatures("bf16", "fp8e4nv", "fp32", grouped=False).items():
            specs.append(KernelSpec(name=f"fused_moe_fp8_{name}_bf16_n{bn}", fn=fn, signature=sig,
                                    constexprs={**consts, **units}, num_warps=_moe.DECODE_NUM_WARPS,
                                    num_stages=_moe.DECODE_NUM_STAGES, archs=("sm_90",)))
    return specs


COMPILE_SPECS: list[KernelSpec] = _compile_specs()

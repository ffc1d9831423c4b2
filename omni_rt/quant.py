"""Block-FP8 weights: the format Qwen uses for its own FP8 releases, and which tensors it applies to.

A quantized matrix ``W: (N, K)`` is stored as ``W_q: (N, K) float8_e4m3fn`` and ``W.weight_scale_inv:
(ceil(N/bn), ceil(K/bk))`` (block ``[bn, bk] = [128, 128]``), with ``W ≈ W_q · scale[n // bn, k // bk]``
(despite its name the stored scale is *multiplied* in, the DeepSeek-V3 convention). Edge blocks may be partial.

Quantization (load-time, and ``testing.make_checkpoint(quantization="fp8")``): per block, scale = amax / 448
(the largest finite e4m3 value), ``W_q = (W / scale).to(float8_e4m3fn)`` (round to nearest even); an all-zero
block gets scale 0 and zero codes.

Fused weights (``experts.gate_up_proj``) keep their parts' grids: each part is quantized on its own grid and the
parts' scale rows are concatenated, so row ``n`` of part ``p`` (starting at row ``r_p``) reads scale row
``s_p + (n - r_p) // bn`` where ``s_p`` is the number of scale rows of the parts before it (``scale_row_map``).
"""
from __future__ import annotations

import math
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"

# Decoder-layer projections of the thinker and talker text models; nothing else is quantized (embeddings,
# norms, routers, lm_head/codec_head, shared_expert_gate, text/hidden projections, the encoders, the code
# predictor and Code2Wav stay in the compute dtype).
_ELIGIBLE = re.compile(
    r"^(thinker|talker)\.model\.layers\.\d+\."
    r"(self_attn\.(q|k|v|o)_proj"
    r"|mlp\.(gate|up|down)_proj"
    r"|mlp\.experts\.\d+\.(gate|up|down)_proj"
    r"|mlp\.shared_expert\.(gate|up|down)_proj)\.weight$")


def is_fp8_eligible(name: str) -> bool:
    """Whether on-disk tensor ``name`` is one omni_rt keeps in FP8 (when the device supports it)."""
    return _ELIGIBLE.match(name) is not None


def scale_name(weight_name: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv`` (also for stacked expert names: ``x.gate_up_proj_scale_inv``)."""
    return weight_name + SCALE_SUFFIX


def module_name(weight_name: str) -> str:
    """``x.q_proj.weight`` -> ``x.q_proj`` (the names ``modules_to_not_convert`` lists)."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """Scale grid of a matrix (or a stack of matrices): ``(..., ceil(N/bn), ceil(K/bk))``."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., N, K) float → (codes (..., N, K) float8_e4m3fn, scale (..., ceil(N/bn), ceil(K/bk)) fp32).

    Computed in fp32 on w's device; partial edge blocks take the amax of their real elements only.
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_blockwise needs a matrix, got shape {tuple(w.shape)}")
    bn, bk = block
    *lead, n, k = w.shape
    gn, gk = math.ceil(n / bn), math.ceil(k / bk)
    x = w.float()
    padded = torch.nn.functional.pad(x, (0, gk * bk - k, 0, gn * bn - n))  # zeros do not change |amax|
    blocks = padded.reshape(*lead, gn, bn, gk, bk)
    scale = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX                      # (..., gn, gk)
    full = expand_scale(scale, n, k, block)
    q = torch.where(full > 0, x / torch.where(full > 0, full, 1.0), 0.0)
    return q.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_parts(w: torch.Tensor, parts: tuple[int, ...],
                   block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused weight (..., sum(parts), K) quantized part by part, each on its own grid; scale rows
    concatenated in part order (the layout ``dequantize_blockwise(..., parts=parts)`` reads)."""
    qs, ss = zip(*(quantize_blockwise(p, block) for p in torch.split(w, list(parts), dim=-2)))
    return torch.cat(qs, dim=-2), torch.cat(ss, dim=-2)


def expand_scale(scale: torch.Tensor, n: int, k: int, block: tuple[int, int] = BLOCK,
                 row_map: torch.Tensor | None = None) -> torch.Tensor:
    """scale (..., gn, gk) → per-element (..., n, k); ``row_map`` (n,) gives each row's scale row (fused)."""
    rows = row_map if row_map is not None else torch.arange(n, device=scale.device) // block[0]
    cols = torch.arange(k, device=scale.device) // block[1]
    return scale.index_select(-2, rows.to(scale.device)).index_select(-1, cols)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                         block: tuple[int, int] = BLOCK, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """codes (..., N, K) fp8 + scale → (..., N, K) in ``dtype``: ``(q.float() * scale).to(dtype)``.

    ``parts`` (row counts summing to N) for a fused weight whose parts were quantized on their own grids.
    """
    n, k = q.shape[-2:]
    row_map = scale_row_map(parts, block[0], q.device) if parts is not None else None
    want = scale_shape(q.shape, block) if parts is None else (
        *q.shape[:-2], sum(math.ceil(p / block[0]) for p in parts), math.ceil(k / block[1]))
    if tuple(scale.shape) != tuple(want):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match codes {tuple(q.shape)} (want {want})")
    return (q.float() * expand_scale(scale.float(), n, k, block, row_map)).to(dtype)


def scale_row_map(parts: tuple[int, ...], bn: int, device=None) -> torch.Tensor:
    """(sum(parts),) int64: the scale row of each row of a weight fused from parts on their own grids."""
    maps, base = [], 0
    for p in parts:
        maps.append(base + torch.arange(p, device=device) // bn)
        base += math.ceil(p / bn)
    return torch.cat(maps)


def fp8_supported(device: torch.device | str) -> bool:
    """Whether FP8 weights can stay FP8 on ``device``: CUDA with hardware e4m3 conversion (sm_89 / sm_90+).

    Queried when a model is loaded, never at import. CPU and sm_80 get weights dequantized at load.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)

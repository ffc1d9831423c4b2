"""Shared building blocks: RMSNorm, rotary embeddings (1-D and interleaved M-RoPE), the q/k-norm GQA
attention front that calls the paged-KV kernels, dense SwiGLU MLP, and fused projections.

Fused projections: q/k/v are one GEMM (``qkv_proj``, rows q then k then v) and a dense MLP's gate/up are one GEMM
(``gate_up_proj``, gate rows first). Checkpoints keep transformers' separate matrices; ``loader.assign_parameters``
(and ``load_state_dict`` through ``fuse_parts_on_load``) concatenates them at load time (``layout.fused_target``).

Numerics follow transformers' Qwen3-Omni modules exactly (fp32 norm statistics, cos/sin computed in fp32 and
cast to the activation dtype) so fp32 runs agree with the oracle to ~1e-6 and bf16 runs round the same way.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..kernels import fp8_linear as _fp8
from ..kernels import qk_norm_rope as _qk_norm_rope
from ..kernels import rms_norm as _rms_norm
from ..kernels import silu_mul as _silu_mul
from ..layout import fused_parts, fused_target
from ..sampling import to_device  # noqa: F401 - re-exported for the models
from ..kernels import paged_attention as _paged
from ..kernels import prefill_attention as _prefill


def text_positions(start: int, length: int, device=None) -> torch.Tensor:
    """M-RoPE positions (3, length) float32 for text and audio tokens: the same index on t, h and w.

    transformers' get_rope_index gives plain cumulative positions for prompts without images or videos (audio
    tokens included), so the rows are equal. Positions are float32 everywhere (video makes TM-RoPE positions
    fractional); position·inv_freq is computed in fp32 from them, never through an integer-indexed table.
    """
    return torch.arange(start, start + length, dtype=torch.float32, device=device).expand(3, length)


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight stays block-FP8 in device memory (sm_89/sm_90).

    weight: (out, in) float8_e4m3fn codes; weight_scale_inv: (ceil(out/128), ceil(in/128)) fp32 (the on-disk
    names of Qwen's FP8 format). Forward dequantizes inside the GEMM's K loop (``kernels.fp8_linear``).
    ``parts`` (row counts): a fused weight (q/k/v, gate/up) whose parts were quantized each on its own 128×128
    grid before fusion; weight_scale_inv is then their grids stacked, (Σ ceil(part/128), ceil(in/128)).
    ``act_fp8_min_tokens``: from this many tokens on (prefill), also quantize activations (w8a8); None = never.
    """

    def __init__(self, in_features: int, out_features: int, parts: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.parts = tuple(parts) if parts is not None else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(_fp8.scale_rows(out_features, self.parts),
                                                         -(-in_features // 128)), requires_grad=False)
        self.act_fp8_min_tokens: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) → (..., out) in x's dtype."""
        w8a8 = self.act_fp8_min_tokens is not None and x.numel() // x.shape[-1] >= self.act_fp8_min_tokens
        return _fp8.fp8_linear(x, self.weight, self.weight_scale_inv, act_fp8=w8a8, parts=self.parts)


class FusedLinear(nn.Linear):
    """One GEMM for several projections of the same input: weight (Σ parts, in), rows part after part (and the
    bias likewise). ``parts``: the output widths, in row order. Forward returns the fused (..., Σ parts) output;
    callers split it with views (``split``)."""

    def __init__(self, in_features: int, parts: tuple[int, ...], bias: bool = False):
        super().__init__(in_features, sum(parts), bias=bias)
        self.parts = tuple(parts)


def make_linear(in_features: int, out_features: int | tuple[int, ...], fp8: bool = False,
                bias: bool = False) -> nn.Module:
    """nn.Linear, or FP8Linear when the weights stay FP8 on the device (bias-free only). ``out_features`` as a
    tuple of part widths: one fused projection (FusedLinear / FP8Linear with ``parts``)."""
    parts = tuple(out_features) if isinstance(out_features, (tuple, list)) else None
    out = sum(parts) if parts is not None else out_features
    if fp8:
        if bias:
            raise ValueError("FP8Linear has no bias")
        return FP8Linear(in_features, out, parts)
    return FusedLinear(in_features, parts, bias) if parts is not None else nn.Linear(in_features, out, bias=bias)


def split(y: torch.Tensor, parts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The parts of a fused projection's output (..., Σ parts) as views (no copy, no launch)."""
    return y.split(parts, dim=-1)


def fuse_parts_on_load(module: nn.Module) -> None:
    """Let ``module.load_state_dict`` (and a parent's) take transformers' separate q/k/v (gate/up) tensors for this
    module's fused parameters: a pre-hook concatenates a complete set of parts (``layout.fused_target``) into the
    fused name before torch matches keys. Incomplete sets are left alone, so torch reports them as usual."""
    module.register_load_state_dict_pre_hook(_fuse_state_dict_parts)


def _fuse_state_dict_parts(module, state_dict, prefix, *_):
    own = {prefix + n for n, _ in module.named_parameters()}
    targets = {fused_target(k)[0] for k in list(state_dict) if k.startswith(prefix) and fused_target(k) is not None}
    for target in targets:
        names = fused_parts(target)
        if target in own and all(n in state_dict for n in names):
            state_dict[target] = torch.cat([state_dict.pop(n) for n in names])


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps); statistics in fp32, scaled in the input dtype (as the reference).

    ``forward(x, residual)`` normalises ``x + residual`` and returns ``(y, x + residual)``: the decoder's
    residual add fused into the norm (one kernel, ``kernels.rms_norm``); ``residual_scale`` (dim,) makes the sum
    ``residual + residual_scale · x`` (Code2Wav's layer scale)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_scale: torch.Tensor | None = None):
        return _rms_norm.rms_norm(x, self.weight, self.eps, residual, residual_scale)


class Rotary(nn.Module):
    """Rotary tables for positions ``(3, tokens)`` (t, h, w) with interleaved M-RoPE sections, or ``(tokens,)``.

    Interleaved recomposition (reference ``recomposition_frequencies``): frequency index i takes the T row,
    except i ≡ 1 (mod 3) below 3·section[1] takes H and i ≡ 2 (mod 3) below 3·section[2] takes W. With equal
    rows (text and audio prompts) this is plain 1-D RoPE.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        self.inv_freq: torch.Tensor | None = None
        self.axis: torch.Tensor | None = None

    def materialize_buffers(self, device: torch.device) -> None:
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float,
                                                           device=device) / self.head_dim))
        half = self.head_dim // 2
        axis = torch.zeros(half, dtype=torch.long, device=device)
        if self.mrope_section:
            for dim, offset in ((1, 1), (2, 2)):
                axis[offset: self.mrope_section[dim] * 3: 3] = dim
        self.axis = axis

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, tokens) or (tokens,), float32 (or integer) → cos, sin: (tokens, head_dim) in ``dtype``."""
        if self.inv_freq is None or self.inv_freq.device != positions.device:
            self.materialize_buffers(positions.device)
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * self.inv_freq
        else:
            # (3, T, half) then pick the axis per frequency index.
            all_freqs = positions.float()[..., None] * self.inv_freq
            freqs = all_freqs.gather(0, self.axis.view(1, 1, -1).expand(1, positions.shape[1], -1))[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclasses.dataclass
class AttentionMetadata:
    """Where a step's tokens live in the paged KV cache.

    slot_mapping: (tokens,) int64 — page slot of each new token (block * block_size + offset).
    block_tables: (batch, max_blocks) int32; context_lens: (batch,) int32, new tokens included.
    cu_seqlens_q: (batch + 1,) int32 for prefill (varlen queries at the end of each context); None for decode
    (one query per sequence). max_query_len is a host int used only by the (eager) prefill launch.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_query_len: int = 1

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm and rotary, over a paged KV cache."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, fp8: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # q, k and v in one GEMM (the checkpoint's q_proj/k_proj/v_proj, concatenated at load)
        self.qkv_proj = make_linear(hidden, (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), fp8)
        self.o_proj = make_linear(heads * head_dim, hidden, fp8)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        fuse_parts_on_load(self)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """x: (tokens, hidden) → (tokens, hidden). Writes the new K/V into ``kv_cache`` pages first."""
        t = x.shape[0]
        q, k, v = split(self.qkv_proj(x), self.qkv_proj.parts)   # strided views: the kernels take row strides
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        # q/k norms, rotary and the K/V page write: one kernel on the Triton path
        q, k = _qk_norm_rope.qk_norm_rope(q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin,
                                          kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        if meta.is_decode:
            out = _paged.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                self.scale)
        else:
            out = _prefill.prefill_attention(q, k, v, meta.cu_seqlens_q, k_cache, v_cache, meta.block_tables,
                                             meta.context_lens, self.scale, max_seqlen_q=meta.max_query_len)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one GEMM (``gate_up_proj``: (2I, H), gate rows first; the
    checkpoint's gate_proj/up_proj concatenated at load) and silu·mul as one kernel; ``fp8``: block-FP8 weights
    (FP8Linear, each part on its own scale grid)."""

    def __init__(self, hidden: int, intermediate: int, fp8: bool = False):
        super().__init__()
        self.gate_up_proj = make_linear(hidden, (intermediate, intermediate), fp8)
        self.down_proj = make_linear(intermediate, hidden, fp8)
        fuse_parts_on_load(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., hidden) → (..., hidden)."""
        return self.down_proj(_silu_mul.silu_mul(self.gate_up_proj(x)))

"""Streaming transposed 1-D convolution (Code2Wav's upsamplers) with a fused SnakeBeta on the input, the
pre-start mask and the carried overlap ("tail"): one launch instead of ~21 ATen ops (snake: 10, mask: 7,
conv_transpose1d, tail add, cat, bias add).

Semantics (transformers' ``Qwen3OmniMoeCausalTransConvNet``, streamed; kernel K, stride s, s <= K <= 2s, overlap
ov = K - s):

    a         = act(zero_pre_start(x))                  # SnakeBeta optional; (B, C_in, L)
    full      = conv_transpose1d(a, weight, stride=s)   # (B, C_out, L·s + ov)
    full[:ov] += tail                                   # the previous chunk's overlapping partial sums
    y         = full[:, :, :L·s] + bias                 # (B, C_out, L·s): final samples
    new_tail  = full[:, :, L·s:]                        # (B, C_out, ov), no bias: the next chunk adds to it

Calling it on chunks with the tail carried equals one call on their concatenation (the reference trims
K - s samples on both ends; the right trim is exactly the part held back as the tail).

Kernel: output sample t = j·s + m (phase m < s) is y[o, t] = Σ_c W[c, o, m]·a[c, j] + [m < ov]·Σ_c W[c, o, m + s]·
a[c, j - 1], i.e. per phase a width-2 causal conv: one program per (input-position block, out-block × phase,
stream) accumulates two ``tl.dot``s per input-channel block in fp32; positions j = L carry the new tail, j - 1 = -1
reads the old tail. One-frame chunks give few such tiles, so the input channels are split over several programs
per tile (``causal_conv1d``'s deterministic last-arrival reduction) until every SM has one. Weight any
strides; ``prepare_weight``'s (K, C_out, C_in) storage makes the tile loads contiguous along C_in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import KernelSpec, use_triton
from .causal_conv1d import (SNAKE_EPS, _snake_params, _split_arrive, _split_for, _split_total, snake_beta_ref,
                            tile_counters, zero_pre_start)

__all__ = ["trans_conv1d", "trans_conv1d_ref", "prepare_weight", "COMPILE_SPECS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _act_tile(x_ptr, alpha_e, inv_beta, b, offs_c, cmask, j, L, lead, sxb, sxc, sxt, HAS_SNAKE: tl.constexpr):
    """(BLOCK_C, BLOCK_J) tile of act(x) at input positions j (outside [lead, L) -> 0)."""
    m = cmask[:, None] & ((j >= lead) & (j >= 0) & (j < L))[None, :]
    xv = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + j[None, :] * sxt, mask=m, other=0.0)
    if HAS_SNAKE:
        xf = xv.to(tl.float32)
        sn = tl.sin(xf * alpha_e[:, None])
        xv = (xf + inv_beta[:, None] * sn * sn).to(xv.dtype)  # rounded as the reference's activation
    return xv


@triton.jit
def _trans_conv1d_kernel(
    x_ptr, w_ptr, bias_ptr, tail_ptr, alpha_ptr, beta_ptr, pos_ptr, y_ptr, to_ptr, ws_ptr, cnt_ptr,
    C_in, C_out, L, lag, unit,
    sxb, sxc, sxt, swi, swo, swk, stb, stc, stt, syb, syc, syt, sob, soc, sot,
    STRIDE: tl.constexpr, OVERLAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr,
    WRITE_TAIL: tl.constexpr, HAS_SNAKE: tl.constexpr, HAS_LEAD: tl.constexpr, EPS: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """x: (B, C_in, L), w: (C_in, C_out, STRIDE + OVERLAP), tail/tail_out: (B, C_out, OVERLAP), y: (B, C_out, L·s).

    SPLIT > 1 splits the input channels over SPLIT programs per (position block, out-block × phase) tile, as the
    dense causal conv does: each stores its fp32 partial in ws (SPLIT, B, C_out, (L + 1)·s) and bumps the tile's
    counter in cnt (int32, zero between launches); the last to arrive sums the partials in split order
    (deterministic), finishes the tile and resets the counter."""
    pid_j = tl.program_id(0)
    pid_oms = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pid_om = pid_oms // SPLIT
    split = pid_oms % SPLIT
    m = pid_om % STRIDE          # the phase: output samples j·s + m
    pid_o = pid_om // STRIDE
    lead = 0
    if HAS_LEAD:  # int64 product (long streams); the result is <= lag
        lead = tl.maximum(lag - tl.load(pos_ptr + b) * unit, 0).to(tl.int32)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # input positions 0..L (L: the tail's)
    omask = offs_o < C_out
    # this phase also takes the previous input position (tap m + s); as vectors (a scalar mask is not
    # portable across the interpreter and the compiler)
    two_o = (tl.zeros([BLOCK_O], dtype=tl.int32) + m) < OVERLAP
    two_c = (tl.zeros([BLOCK_C], dtype=tl.int32) + m) < OVERLAP
    two_j = (tl.zeros([BLOCK_J], dtype=tl.int32) + m) < OVERLAP
    acc = tl.zeros([BLOCK_O, BLOCK_J], dtype=tl.float32)
    n_cb = tl.cdiv(C_in, BLOCK_C)
    per = tl.cdiv(n_cb, SPLIT)  # in-blocks of this split: [split·per, min((split+1)·per, n_cb))
    for cb in range(split * per, tl.minimum((split + 1) * per, n_cb)):
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C_in
        alpha_e, inv_beta = _snake_params(alpha_ptr, beta_ptr, offs_c, cmask, HAS_SNAKE, EPS)
        wmask = omask[:, None] & cmask[None, :]
        w0 = tl.load(w_ptr + offs_c[None, :] * swi + offs_o[:, None] * swo + m * swk, mask=wmask, other=0.0)
        a0 = _act_tile(x_ptr, alpha_e, inv_beta, b, offs_c, cmask, j, L, lead, sxb, sxc, sxt, HAS_SNAKE)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(w0, a0, acc, input_precision="ieee")
        else:
            acc = tl.dot(w0, a0, acc)
        if OVERLAP > 0:
            w1 = tl.load(w_ptr + offs_c[None, :] * swi + offs_o[:, None] * swo + (m + STRIDE) * swk,
                         mask=wmask & two_o[:, None], other=0.0)
            a1 = _act_tile(x_ptr, alpha_e, inv_beta, b, offs_c, cmask & two_c, j - 1, L, lead, sxb, sxc, sxt,
                           HAS_SNAKE)
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(w1, a1, acc, input_precision="ieee")
            else:
                acc = tl.dot(w1, a1, acc)
    if SPLIT == 1:
        _finish(acc, bias_ptr, tail_ptr, y_ptr, to_ptr, b, offs_o, omask, j, m, L, two_j, stb, stc, stt, syb, syc,
                syt, sob, soc, sot, STRIDE, OVERLAP, HAS_BIAS, HAS_TAIL, WRITE_TAIL)
    else:
        n_t = (L + 1) * STRIDE   # a tile's workspace row: phases interleaved as in y, plus the tail's position L
        tile = (b * (tl.num_programs(1) // SPLIT) + pid_om) * tl.num_programs(0) + pid_j
        ws_tile = (b * C_out + offs_o[:, None]) * n_t + (j * STRIDE + m)[None, :]
        tile_mask = omask[:, None] & (j <= L)[None, :]
        split_stride = tl.num_programs(2) * C_out * n_t
        if _split_arrive(acc, ws_ptr, cnt_ptr, ws_tile, tile_mask, split, split_stride, tile, SPLIT):
            acc = _split_total(acc, ws_ptr, ws_tile, tile_mask, split_stride, SPLIT)
            _finish(acc, bias_ptr, tail_ptr, y_ptr, to_ptr, b, offs_o, omask, j, m, L, two_j, stb, stc, stt, syb,
                    syc, syt, sob, soc, sot, STRIDE, OVERLAP, HAS_BIAS, HAS_TAIL, WRITE_TAIL)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (graph replays included)


@triton.jit
def _finish(acc, bias_ptr, tail_ptr, y_ptr, to_ptr, b, offs_o, omask, j, m, L, two_j, stb, stc, stt, syb, syc, syt,
            sob, soc, sot, STRIDE: tl.constexpr, OVERLAP: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_TAIL: tl.constexpr, WRITE_TAIL: tl.constexpr):
    """The (BLOCK_O, BLOCK_J) tile of phase m once every input channel is in ``acc``: the new tail (j == L), the
    old tail added (j == 0), the bias, and the final samples y[:, j·s + m] (j < L)."""
    t = j * STRIDE + m
    if WRITE_TAIL:  # j == L, phase m < ov: the next chunk's partial sums (bias not added)
        tmask = omask[:, None] & ((j == L) & two_j)[None, :]
        tl.store(to_ptr + b * sob + offs_o[:, None] * soc + m * sot + j[None, :] * 0,
                 acc.to(to_ptr.dtype.element_ty), mask=tmask)
    if HAS_TAIL:  # j == 0, phase m < ov: the previous chunk's partial sums
        first = ((j == 0) & two_j)[None, :]
        tv = tl.load(tail_ptr + b * stb + offs_o[:, None] * stc + m * stt + j[None, :] * 0,
                     mask=omask[:, None] & first, other=0.0)
        acc += tv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + b * syb + offs_o[:, None] * syc + t[None, :] * syt, acc.to(y_ptr.dtype.element_ty),
             mask=omask[:, None] & (j < L)[None, :])


# ----------------------------------------------------------------------------------------------- launch
def _config(c_in: int, c_out: int, length: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_J, num_warps): a one-frame chunk has 1-640 input positions; the grid already
    multiplies by the stride (one program per phase), so the tiles stay small for short chunks."""
    bj = 16 if length < 32 else 32
    if dtype == torch.float32:
        # ieee FMA dots: ptxas settles on 128 registers at 4 or 8 warps over the 16-position tile and spills a few
        # bytes (sm_80 under triton 3.9, sm_90 under 3.6); 2 warps compile clean under both
        return 32, 16, bj, 2 if bj == 16 else 4
    # 8 warps: at 4, ptxas (triton 3.6) caps these at 128 registers on sm_80 / 80 on sm_90 and spills.
    return 32, 32, bj, 8


def _tiles(c_in: int, c_out: int, length: int, stride: int, dtype: torch.dtype,
           batch: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_J, num_warps, SPLIT): ``_config``'s tiles, then an input-channel split up to the
    dense conv's MIN_PROGRAMS (the released 1024 -> 1024 upsamplers launch 64 tiles at one frame)."""
    bo, bc, bj, warps = _config(c_in, c_out, length, dtype)
    programs = triton.cdiv(length + 1, bj) * triton.cdiv(c_out, bo) * stride * batch
    return bo, bc, bj, warps, _split_for(programs, triton.cdiv(c_in, bc))


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: (in, out, K) (ConvTranspose1d's layout) -> same logical tensor stored (K, out, in)-contiguous, so
    the kernel's (out-block x in-block) tile loads are contiguous along ``in``. Results are identical."""
    return weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)


def _check(x, weight, bias, stride, tail, snake_alpha, snake_beta, pre_start, tail_out):
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"trans_conv1d: x must be (batch, in, length) and weight (in, out, K); got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"trans_conv1d: x and weight must share one of fp16/bf16/fp32; got {x.dtype}, {weight.dtype}")
    B, c_in, _ = x.shape
    c_out, k = weight.shape[1], weight.shape[2]
    if not (isinstance(stride, int) and stride >= 1 and stride <= k <= 2 * stride):
        raise ValueError(f"trans_conv1d: need stride <= kernel <= 2·stride; got kernel {k}, stride {stride}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"trans_conv1d: bias must be ({c_out},); got {tuple(bias.shape)}")
    ov = k - stride
    for name, t in (("tail", tail), ("tail_out", tail_out)):
        if t is not None and (tuple(t.shape) != (B, c_out, ov) or t.dtype != x.dtype):
            raise ValueError(f"trans_conv1d: {name} must be {(B, c_out, ov)} {x.dtype}; got {tuple(t.shape)} {t.dtype}")
    if (snake_alpha is None) != (snake_beta is None):
        raise ValueError("trans_conv1d: pass both snake_alpha and snake_beta, or neither")
    for name, p in (("snake_alpha", snake_alpha), ("snake_beta", snake_beta)):
        if p is not None and tuple(p.shape) != (c_in,):
            raise ValueError(f"trans_conv1d: {name} must be ({c_in},); got {tuple(p.shape)}")
    if pre_start is not None:
        pos, lag, unit = pre_start
        if tuple(pos.shape) != (B,) or pos.dtype != torch.int64 or lag < 0 or unit < 1:
            raise ValueError("trans_conv1d: pre_start must be (pos (batch,) int64, lag >= 0, unit >= 1)")


def trans_conv1d_ref(x, weight, bias=None, stride: int = 1, tail=None, snake_alpha=None, snake_beta=None,
                     pre_start=None):
    """The PyTorch reference (the model's former ops, in x's dtype). Returns (y (B, C_out, L·s), new tail)."""
    if pre_start is not None:
        x = zero_pre_start(x, *pre_start)
    if snake_alpha is not None:
        x = snake_beta_ref(x, snake_alpha, snake_beta)
    ov = weight.shape[-1] - stride
    length = x.shape[-1] * stride
    y = F.conv_transpose1d(x, weight, None, stride=stride)
    if ov and tail is not None:
        y = torch.cat([y[..., :ov] + tail, y[..., ov:]], dim=-1)
    new_tail = y[..., length:]
    y = y[..., :length]
    return (y + bias[:, None] if bias is not None else y), new_tail


def trans_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                 tail: torch.Tensor | None = None, snake_alpha: torch.Tensor | None = None,
                 snake_beta: torch.Tensor | None = None, pre_start: tuple[torch.Tensor, int, int] | None = None,
                 tail_out: torch.Tensor | None = None, split: int | None = None):
    """Streaming transposed conv (see the module docstring). x: (B, C_in, L) any strides; weight (C_in, C_out,
    K); bias (C_out,); tail: (B, C_out, K - s) or None (zeros: stream start); snake_alpha/beta: (C_in,) log-scale
    SnakeBeta on x; pre_start: (pos (B,) int64, lag, unit) zeroes x's samples t < lag - pos·unit; tail_out: where
    to write the new tail (must not overlap tail); split: input-channel splits per tile (default: from the shapes,
    enough programs for every SM; tests pin it). Returns (y (B, C_out, L·s), new tail (B, C_out, K - s))."""
    _check(x, weight, bias, stride, tail, snake_alpha, snake_beta, pre_start, tail_out)
    if not use_triton(x, weight):
        y, nt = trans_conv1d_ref(x, weight, bias, stride, tail, snake_alpha, snake_beta, pre_start)
        return y, (tail_out.copy_(nt) if tail_out is not None else nt)
    B, c_in, L = x.shape
    c_out, k = weight.shape[1], weight.shape[2]
    ov = k - stride
    y = torch.empty((B, c_out, L * stride), device=x.device, dtype=x.dtype)
    if tail_out is None:
        tail_out = torch.empty((B, c_out, ov), device=x.device, dtype=x.dtype)
    if B == 0 or L == 0:
        if L == 0 and ov:  # nothing new: the tail carries over unchanged
            tail_out.copy_(tail) if tail is not None else tail_out.zero_()
        return y, tail_out
    has_tail = tail is not None and ov > 0
    has_lead = pre_start is not None and pre_start[1] > 0
    pos, lag, unit = pre_start if has_lead else (x, 0, 1)
    has_snake = snake_alpha is not None
    dummy = x
    bo, bc, bj, warps, auto_split = _tiles(c_in, c_out, L, stride, x.dtype, B)
    split = auto_split if split is None else split
    tiles = triton.cdiv(L + 1, bj) * triton.cdiv(c_out, bo) * stride * B
    grid = (triton.cdiv(L + 1, bj), triton.cdiv(c_out, bo) * stride * split, B)
    if split > 1:
        ws = torch.empty((split, B, c_out, (L + 1) * stride), device=x.device, dtype=torch.float32)
        cnt = tile_counters(x.device, tiles)
    else:
        ws, cnt = dummy, dummy
    _trans_conv1d_kernel[grid](
        x, weight, bias if bias is not None else dummy, tail if has_tail else dummy,
        snake_alpha if has_snake else dummy, snake_beta if has_snake else dummy, pos, y,
        tail_out if ov > 0 else dummy, ws, cnt,
        c_in, c_out, L, lag, unit,
        *x.stride(), *weight.stride(), *(tail.stride() if has_tail else (0, 0, 0)), *y.stride(),
        *(tail_out.stride() if ov > 0 else (0, 0, 0)),
        STRIDE=stride, OVERLAP=ov, HAS_BIAS=bias is not None, HAS_TAIL=has_tail, WRITE_TAIL=ov > 0,
        HAS_SNAKE=has_snake, HAS_LEAD=has_lead, EPS=SNAKE_EPS, SPLIT=split, BLOCK_O=bo, BLOCK_C=bc, BLOCK_J=bj,
        num_warps=warps, num_stages=2)
    return y, tail_out


# -------------------------------------------------------------------------------------- compile specs
def _specs() -> list[KernelSpec]:
    """The released upsamplers at one-frame lengths: 1024 -> 1024 (K = s = 2, no snake, no tail; the second with
    the pre-start mask) and the decoder's 1536 -> 768 (8), 768 -> 384 (5), 384 -> 192 (4), 192 -> 96 (3) with
    K = 2s, snake, tail and mask; fp16/bf16/fp32; each with the input-channel split its shape gets at batch 1."""
    tname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    specs = []
    for dt in _DTYPES:
        t = tname[dt]
        sig = {n: f"*{t}" for n in ("x_ptr", "w_ptr", "bias_ptr", "tail_ptr", "y_ptr", "to_ptr")}
        sig.update(alpha_ptr="*fp32", beta_ptr="*fp32", pos_ptr="*i64", ws_ptr="*fp32", cnt_ptr="*i32", C_in="i32",
                   C_out="i32", L="i32", lag="i32", unit="i32")
        sig.update({s: "i32" for s in ("sxb", "sxc", "sxt", "swi", "swo", "swk", "stb", "stc", "stt", "syb", "syc",
                                       "syt", "sob", "soc", "sot")})
        uses = [("up1", 1024, 1024, 2, 2, False, False, 1), ("up2", 1024, 1024, 2, 2, False, True, 2),
                ("dec8", 1536, 768, 16, 8, True, True, 4), ("dec5", 768, 384, 10, 5, True, True, 32),
                ("dec4", 384, 192, 8, 4, True, True, 160), ("dec3", 192, 96, 6, 3, True, True, 640)]
        for name, c_in, c_out, k, s, snake, lead, length in uses:
            bo, bc, bj, warps, split = _tiles(c_in, c_out, length, s, dt, 1)
            specs.append(KernelSpec(
                name=f"trans_conv1d_{name}_{t}", fn=_trans_conv1d_kernel, signature=sig,
                constexprs=dict(STRIDE=s, OVERLAP=k - s, HAS_BIAS=True, HAS_TAIL=k > s, WRITE_TAIL=k > s,
                                HAS_SNAKE=snake, HAS_LEAD=lead, EPS=SNAKE_EPS, SPLIT=split, BLOCK_O=bo, BLOCK_C=bc,
                                BLOCK_J=bj),
                num_warps=warps, num_stages=2))
    return specs


COMPILE_SPECS: list[KernelSpec] = _specs()

"""Causal 1-D convolution with streaming state and an optional fused SnakeBeta on the input (Code2Wav).

Semantics (pinned to transformers' ``Qwen3OmniMoeCausalConvNet`` / ``Qwen3OmniMoeSnakeBeta``, stride 1):

    xs = cat(state, act(x))                      # (batch, in_ch, S + length), S = (width - 1) * dilation
    y  = conv1d(xs, weight, bias, dilation, groups)   # valid conv -> (batch, out_ch, length)
    new_state = xs[..., -S:]

``state`` holds the last S *post-activation* inputs of the previous call (zeros = start of stream, which is
exactly the reference's left zero padding since SnakeBeta(0) = 0). Storing the post-activation values means a
chunk never re-applies the activation to its history, and calling on chunks [x1, x2] with the state carried
gives the same y as one call on cat(x1, x2). For stride 1 the reference's "extra right padding" is always 0,
so none is applied here.

SnakeBeta (log-scale parameters, per input channel): ``act(x) = x + 1 / (exp(beta) + 1e-9) * sin(x * exp(alpha))^2``,
computed in fp32 and rounded to x's dtype (the dtype the state is stored in and the conv operands use).

Triton paths:
  * dense (groups == 1): implicit GEMM, per program an (out-block x time-block) tile accumulated in fp32 with
    ``tl.dot`` over (in-block x width) slices; covers width 7 dilation 1/3/9, width 1 (pointwise),
    1024 -> 1536 and 96 -> 1.
  * depthwise (groups == in_ch == out_ch): per-channel FMA over the width.
The new state is written by the programs of time block 0 (out block 0 for the dense kernel), so one launch
does everything. ``state_out`` must not alias ``state`` (other programs still read the old state).

Weight layout: any strided view is accepted. For the dense kernel the (width, out, in)-contiguous storage of
``prepare_weight`` makes the weight tile loads coalesced; with short streaming chunks the weight is most of
the bytes moved, so the model should keep its conv weights in that layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import KernelSpec, use_triton

__all__ = ["causal_conv1d", "causal_conv1d_ref", "snake_beta_ref", "zero_pre_start", "prepare_weight",
           "COMPILE_SPECS", "SNAKE_EPS"]

# transformers' Qwen3OmniMoeSnakeBeta.no_div_by_zero
SNAKE_EPS = 1e-9

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_window(x_ptr, state_ptr, alpha_e, inv_beta, b, offs_c, cmask, p, pmask, L, S, lead,
                 sxb, sxc, sxt, ssb, ssc, sst,
                 HAS_STATE: tl.constexpr, HAS_SNAKE: tl.constexpr):
    """(BLOCK_C, BLOCK_P) tile of xs = cat(state, act(x)) at x-positions ``p`` (negative = from state).
    x-positions in [0, lead) read as zero (a fresh stream's pre-start samples; act(0) == 0)."""
    xmask = cmask[:, None] & (pmask & (p >= lead) & (p < L))[None, :]
    xv = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + p[None, :] * sxt, mask=xmask, other=0.0)
    if HAS_SNAKE:
        xf = xv.to(tl.float32)
        s = tl.sin(xf * alpha_e[:, None])
        # round to the input dtype: this is the value the state stores and the dot consumes
        xv = (xf + inv_beta[:, None] * s * s).to(xv.dtype)
    if HAS_STATE:
        smask = cmask[:, None] & (pmask & (p < 0))[None, :]
        sv = tl.load(state_ptr + b * ssb + offs_c[:, None] * ssc + (S + p)[None, :] * sst, mask=smask,
                     other=0.0)
        xv = tl.where((p < 0)[None, :], sv, xv)
    return xv


@triton.jit
def _store_state(x_ptr, state_ptr, so_ptr, alpha_e, inv_beta, b, offs_c, cmask, L, S, lead,
                 sxb, sxc, sxt, ssb, ssc, sst, sob, soc, sot,
                 HAS_STATE: tl.constexpr, HAS_SNAKE: tl.constexpr, BLOCK_S: tl.constexpr):
    # new_state[j] = xs[L + j] in cat(state, act(x)) coordinates, i.e. x-position L + j - S; done in
    # BLOCK_S-column pieces so the (inlined, precise) sin stays at a few elements per thread
    for j0 in range(0, S, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        jmask = j < S
        v = _load_window(x_ptr, state_ptr, alpha_e, inv_beta, b, offs_c, cmask, L + j - S, jmask, L, S, lead,
                         sxb, sxc, sxt, ssb, ssc, sst, HAS_STATE, HAS_SNAKE)
        tl.store(so_ptr + b * sob + offs_c[:, None] * soc + j[None, :] * sot, v,
                 mask=cmask[:, None] & jmask[None, :])


@triton.jit
def _lead(pos_ptr, b, lag, unit, HAS_LEAD: tl.constexpr):
    """Chunk positions before ``lag - pos[b]·unit`` precede a fresh stream's start: they read as zeros."""
    lead = 0
    if HAS_LEAD:  # int64 product: pos·unit outgrows int32 on day-long streams; the result is <= lag
        lead = tl.maximum(lag - tl.load(pos_ptr + b) * unit, 0).to(tl.int32)
    return lead


@triton.jit
def _snake_params(alpha_ptr, beta_ptr, offs_c, cmask, HAS_SNAKE: tl.constexpr, EPS: tl.constexpr):
    if HAS_SNAKE:
        alpha_e = tl.exp(tl.load(alpha_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32))
        inv_beta = 1.0 / (tl.exp(tl.load(beta_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)) + EPS)
    else:
        alpha_e = tl.zeros_like(offs_c).to(tl.float32)
        inv_beta = alpha_e
    return alpha_e, inv_beta


@triton.jit
def _causal_conv1d_dense_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, alpha_ptr, beta_ptr, y_ptr, so_ptr, res_ptr, pos_ptr, ws_ptr, cnt_ptr,
    C_in, C_out, L, dilation, lag, unit,
    sxb, sxc, sxt, swo, swi, swk, ssb, ssc, sst, syb, syc, syt, sob, soc, sot, srb, src, srt,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SNAKE: tl.constexpr,
    WRITE_STATE: tl.constexpr, HAS_RES: tl.constexpr, HAS_LEAD: tl.constexpr, EPS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """x: (B, C_in, L), w: (C_out, C_in, WIDTH), state/state_out: (B, C_in, S), y/res: (B, C_out, L),
    pos: (B,) int64 (x-positions below lag - pos·unit read as zero).

    SPLIT > 1 splits the input channels over SPLIT programs per output tile (short chunks: enough programs to
    pull the weights through every SM): each stores its fp32 partial tile in ws (SPLIT, B, C_out, L) and bumps
    the tile's counter in cnt (int32, zero between launches); the last to arrive sums the partials in split
    order (deterministic), finishes the tile and resets the counter."""
    # time blocks vary fastest so programs sharing a weight block run together (L2 reuse)
    pid_t = tl.program_id(0)
    pid_os = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pid_o = pid_os // SPLIT
    split = pid_os % SPLIT
    S = (WIDTH - 1) * dilation
    lead = _lead(pos_ptr, b, lag, unit, HAS_LEAD)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    omask = offs_o < C_out
    tmask = offs_t < L
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    # one flat runtime loop over (in-block, tap) with a single dot in its body: a constant 7-trip tap loop
    # gets unrolled by LLVM and spills; the snake parameters are re-read per tap (BLOCK_C floats, cached)
    n_cb = tl.cdiv(C_in, BLOCK_C)
    per = tl.cdiv(n_cb, SPLIT)  # in-blocks of this split: [split·per, min((split+1)·per, n_cb))
    for it in range(split * per * WIDTH, tl.minimum((split + 1) * per, n_cb) * WIDTH):
        k = it % WIDTH
        offs_c = (it // WIDTH) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C_in
        alpha_e, inv_beta = _snake_params(alpha_ptr, beta_ptr, offs_c, cmask, HAS_SNAKE, EPS)
        w = tl.load(w_ptr + offs_o[:, None] * swo + offs_c[None, :] * swi + k * swk,
                    mask=omask[:, None] & cmask[None, :], other=0.0)
        xv = _load_window(x_ptr, state_ptr, alpha_e, inv_beta, b, offs_c, cmask,
                          offs_t + k * dilation - S, tmask, L, S, lead,
                          sxb, sxc, sxt, ssb, ssc, sst, HAS_STATE, HAS_SNAKE)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(w, xv, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xv, acc)
    if WRITE_STATE:
        if (pid_t == 0) & (pid_os == 0):
            for c0 in range(0, C_in, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cmask = offs_c < C_in
                alpha_e, inv_beta = _snake_params(alpha_ptr, beta_ptr, offs_c, cmask, HAS_SNAKE, EPS)
                _store_state(x_ptr, state_ptr, so_ptr, alpha_e, inv_beta, b, offs_c, cmask, L, S, lead,
                             sxb, sxc, sxt, ssb, ssc, sst, sob, soc, sot, HAS_STATE, HAS_SNAKE, BLOCK_S)
    if SPLIT == 1:
        _finish_tile(acc, bias_ptr, res_ptr, y_ptr, b, offs_o, offs_t, omask, tmask, syb, syc, syt, srb, src, srt,
                     HAS_BIAS, HAS_RES)
    else:
        tile = (b * (tl.num_programs(1) // SPLIT) + pid_o) * tl.num_programs(0) + pid_t
        ws_tile = (b * C_out + offs_o[:, None]) * L + offs_t[None, :]
        tile_mask = omask[:, None] & tmask[None, :]
        split_stride = tl.num_programs(2) * C_out * L
        if _split_arrive(acc, ws_ptr, cnt_ptr, ws_tile, tile_mask, split, split_stride, tile, SPLIT):
            acc = _split_total(acc, ws_ptr, ws_tile, tile_mask, split_stride, SPLIT)
            _finish_tile(acc, bias_ptr, res_ptr, y_ptr, b, offs_o, offs_t, omask, tmask, syb, syc, syt, srb, src,
                         srt, HAS_BIAS, HAS_RES)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (graph replays included)


@triton.jit
def _split_arrive(acc, ws_ptr, cnt_ptr, ws_tile, tile_mask, split, split_stride, tile, SPLIT: tl.constexpr):
    """The input-channel split's deterministic reduction, shared by the dense and the transposed conv, part 1:
    store this split's fp32 partial ``acc`` at ``ws_ptr + split·split_stride + ws_tile`` and count it in
    ``cnt_ptr[tile]`` (int32, zero between launches). True for the program that arrived last: it then takes
    ``_split_total``, finishes the tile and resets the counter."""
    tl.store(ws_ptr + split * split_stride + ws_tile, acc, mask=tile_mask)
    # acq_rel: our partial is visible before the count, and the last sees every other partial
    return tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT - 1


@triton.jit
def _split_total(acc, ws_ptr, ws_tile, tile_mask, split_stride, SPLIT: tl.constexpr):
    """Part 2: every split's partial summed in split order (the same sum whoever arrives last)."""
    acc = tl.zeros_like(acc)
    for sp in range(SPLIT):
        acc += tl.load(ws_ptr + sp * split_stride + ws_tile, mask=tile_mask, other=0.0)
    return acc


@triton.jit
def _finish_tile(acc, bias_ptr, res_ptr, y_ptr, b, offs_o, offs_t, omask, tmask, syb, syc, syt, srb, src, srt,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:  # the residual unit's skip connection, added in fp32 and rounded once
        acc += tl.load(res_ptr + b * srb + offs_o[:, None] * src + offs_t[None, :] * srt,
                       mask=omask[:, None] & tmask[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptr + b * syb + offs_o[:, None] * syc + offs_t[None, :] * syt,
             acc.to(y_ptr.dtype.element_ty), mask=omask[:, None] & tmask[None, :])


@triton.jit
def _causal_conv1d_depthwise_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, alpha_ptr, beta_ptr, y_ptr, so_ptr, pos_ptr,
    C, L, dilation, lag, unit,
    sxb, sxc, sxt, swc, swk, ssb, ssc, sst, syb, syc, syt, sob, soc, sot,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SNAKE: tl.constexpr,
    WRITE_STATE: tl.constexpr, HAS_LEAD: tl.constexpr, EPS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """x: (B, C, L), w: (C, 1, WIDTH), state/state_out: (B, C, S), y: (B, C, L), pos: (B,) int64."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    S = (WIDTH - 1) * dilation
    lead = _lead(pos_ptr, b, lag, unit, HAS_LEAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cmask = offs_c < C
    tmask = offs_t < L
    alpha_e, inv_beta = _snake_params(alpha_ptr, beta_ptr, offs_c, cmask, HAS_SNAKE, EPS)
    acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for k in range(WIDTH):
        w = tl.load(w_ptr + offs_c * swc + k * swk, mask=cmask, other=0.0).to(tl.float32)
        xv = _load_window(x_ptr, state_ptr, alpha_e, inv_beta, b, offs_c, cmask,
                          offs_t + k * dilation - S, tmask, L, S, lead,
                          sxb, sxc, sxt, ssb, ssc, sst, HAS_STATE, HAS_SNAKE)
        acc += w[:, None] * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + b * syb + offs_c[:, None] * syc + offs_t[None, :] * syt,
             acc.to(y_ptr.dtype.element_ty), mask=cmask[:, None] & tmask[None, :])
    if WRITE_STATE:
        if pid_t == 0:
            _store_state(x_ptr, state_ptr, so_ptr, alpha_e, inv_beta, b, offs_c, cmask, L, S, lead,
                         sxb, sxc, sxt, ssb, ssc, sst, sob, soc, sot, HAS_STATE, HAS_SNAKE, BLOCK_S)


# ----------------------------------------------------------------------------------------------- launch
def _dense_config(c_out: int, length: int, width: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_T, num_warps), chosen to compile spill-free on sm_80 and sm_90 under
    triton 3.6 and 3.9.

    Short streaming chunks get small tiles so that enough programs exist to pull the (dominant) weight
    bytes through many SMs; long ones a bigger GEMM tile. x tiles stay at <= 16 elements per thread because
    the fused snake's precise sin is inlined per element. fp32 dots run as ieee FMA (no tensor cores),
    whose operand registers grow with BLOCK_C, so fp32 uses BLOCK_C = 16; width 1 (a loop over in-blocks
    only, pipelined deeper by the compiler) takes half the in-block of width 7."""
    # 16-bit width-7 tiles run 8 warps: at 4, ptxas (triton 3.6, sm_90) caps them at 96 registers and spills
    # a few bytes; width 1 at 8 warps spills instead, so it keeps 4. The short fp32 width-7 tile is 16 out
    # channels for the same reason (32 spills under 3.6 at 4 warps and under 3.9 on sm_80 at 8).
    wide = 8 if width > 1 else 4
    if dtype == torch.float32:
        if c_out <= 16 or (length <= 64 and width > 1):
            return 16, 16, 32, 4
        return (32, 16, 32, 4) if length <= 64 else (32, 16, 64, 4)
    if c_out <= 16:
        return 16, 32, 64 if length > 64 else 32, 4
    if length <= 64:
        return 32, 64 if width > 1 else 32, 32, wide
    return 64, 32 if width > 1 else 16, 64, wide


_DW_BLOCK_C, _DW_BLOCK_T, _DW_MAX_WARPS = 16, 128, 8
_BLOCK_S = 16


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: (out, in/groups, width) -> same logical tensor stored (width, out, in)-contiguous.

    The dense kernel loads (out-block x in-block) tiles per tap; with this storage those loads are
    contiguous along ``in``. Results are identical for any layout."""
    return weight.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def _validate(x, weight, bias, dilation, groups, state, snake_alpha, snake_beta, out, state_out, residual,
              pre_start):
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, channels, length) and weight (out, in/groups, "
                         f"width); got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    batch, c_in, _ = x.shape
    c_out, c_in_g, width = weight.shape
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"causal_conv1d: x and weight must share one of fp16/bf16/fp32; got {x.dtype}, "
                         f"{weight.dtype}")
    if not isinstance(dilation, int) or dilation < 1 or width < 1:
        raise ValueError(f"causal_conv1d: need dilation >= 1 and width >= 1; got {dilation}, {width}")
    if groups < 1 or c_in % groups or c_out % groups or c_in_g * groups != c_in:
        raise ValueError(f"causal_conv1d: weight {tuple(weight.shape)} does not fit in_ch={c_in} "
                         f"with groups={groups}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c_out):
        raise ValueError(f"causal_conv1d: bias must be ({c_out},); got {tuple(bias.shape)}")
    if (snake_alpha is None) != (snake_beta is None):
        raise ValueError("causal_conv1d: pass both snake_alpha and snake_beta, or neither")
    if snake_alpha is not None:
        for name, p in (("snake_alpha", snake_alpha), ("snake_beta", snake_beta)):
            if p.dim() != 1 or p.shape[0] != c_in:
                raise ValueError(f"causal_conv1d: {name} must be ({c_in},); got {tuple(p.shape)}")
    s = (width - 1) * dilation
    for name, t in (("state", state), ("state_out", state_out)):
        if t is not None and (tuple(t.shape) != (batch, c_in, s) or t.dtype != x.dtype):
            raise ValueError(f"causal_conv1d: {name} must be {(batch, c_in, s)} {x.dtype}; got "
                             f"{tuple(t.shape)} {t.dtype}")
    for name, t in (("out", out), ("residual", residual)):
        if t is not None and (tuple(t.shape) != (batch, c_out, x.shape[2]) or t.dtype != x.dtype):
            raise ValueError(f"causal_conv1d: {name} must be {(batch, c_out, x.shape[2])} {x.dtype}; got "
                             f"{tuple(t.shape)} {t.dtype}")
    if pre_start is not None:
        pos, lag, unit = pre_start
        if pos.dim() != 1 or pos.shape[0] != batch or pos.dtype != torch.int64:
            raise ValueError(f"causal_conv1d: pre_start positions must be ({batch},) int64; got "
                             f"{tuple(pos.shape)} {pos.dtype}")
        if not (isinstance(lag, int) and isinstance(unit, int) and lag >= 0 and unit >= 1):
            raise ValueError(f"causal_conv1d: pre_start needs int lag >= 0 and unit >= 1; got {lag}, {unit}")


def _dw_config(channels: int, length: int, batch: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_T, num_warps) for the depthwise kernel: the time tile follows the real length (a
    one-frame ConvNeXt step has 2-4 samples), so short chunks do not run 128-wide mostly-masked tiles; the
    channel tile is the largest of 16/8/4 that gives MIN_PROGRAMS programs (the released 1024 channels at one
    frame: 4, 256 programs), and 16 when none does (tiny shapes stay few programs under the interpreter)."""
    bt = min(max(triton.next_power_of_2(max(length, 1)), 16), _DW_BLOCK_T)
    t_blocks = max(triton.cdiv(length, bt), 1) * batch
    bc = next((c for c in (_DW_BLOCK_C, _DW_BLOCK_C // 2, _DW_BLOCK_C // 4)
               if triton.cdiv(channels, c) * t_blocks >= MIN_PROGRAMS), _DW_BLOCK_C)
    return bc, bt, max(1, min(_DW_MAX_WARPS, bc * bt // 256))


# Programs a dense conv should launch at least (an H100 has 132 SMs): below that, split the input channels.
MIN_PROGRAMS = 132
_MAX_SPLIT = 16
_COUNTERS: dict = {}


def _split_for(programs: int, in_blocks: int) -> int:
    """Input-channel splits for a dense conv with ``programs`` output tiles: enough to reach MIN_PROGRAMS, at
    most one per in-block, and no empty split. From the shapes only: tiny shapes (few in-blocks) stay at 1."""
    if programs >= MIN_PROGRAMS or in_blocks < 2:
        return 1
    want = min(triton.cdiv(MIN_PROGRAMS, programs), in_blocks, _MAX_SPLIT)
    return triton.cdiv(in_blocks, triton.cdiv(in_blocks, want))


def _dense_tiles(c_in: int, c_out: int, length: int, width: int, dtype: torch.dtype,
                 batch: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_T, num_warps, SPLIT) for a dense conv: ``_dense_config``'s tiles, the
    short-chunk ones when the long ones would leave SMs idle, then an input-channel split up to MIN_PROGRAMS."""
    bo, bc, bt, warps = _dense_config(c_out, length, width, dtype)
    if triton.cdiv(length, bt) * triton.cdiv(c_out, bo) * batch < MIN_PROGRAMS and length > 64:
        bo, bc, bt, warps = _dense_config(c_out, 64, width, dtype)
    programs = max(triton.cdiv(length, bt), 1) * triton.cdiv(c_out, bo) * batch
    return bo, bc, bt, warps, _split_for(programs, triton.cdiv(c_in, bc))


def tile_counters(device: torch.device | str, n: int = 0) -> torch.Tensor:
    """Per-device int32 arrival counters of split tiles, zero between launches (the last program of a tile
    resets its counter), so one zeroed buffer serves every launch and graph replay on that device's stream.
    Split convs must not run concurrently on two streams of one device. A model calls it once at load so the
    zero-fill is not part of its first step (nor of a graph capture)."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _causal_conv1d_triton(x, weight, bias, dilation, groups, state, snake_alpha, snake_beta,
                          return_state, out, state_out, residual, pre_start, split=None):
    batch, c_in, length = x.shape
    c_out, _, width = weight.shape
    s = (width - 1) * dilation
    depthwise = groups == c_in and c_out == c_in and groups > 1
    if groups != 1 and not depthwise:
        raise ValueError(f"causal_conv1d (Triton): only dense (groups=1) or depthwise (groups=in=out) "
                         f"convs are supported; got groups={groups}, in={c_in}, out={c_out}")
    if depthwise and residual is not None:
        raise ValueError("causal_conv1d (Triton): residual is fused into the dense kernel only")
    if (state_out is not None and state is not None and s > 0 and x.device.type != "meta"
            and state_out.data_ptr() == state.data_ptr()):  # (meta tensors have no addresses)
        raise ValueError("causal_conv1d: state_out must not alias state (other programs still read it)")
    y = out if out is not None else torch.empty((batch, c_out, length), device=x.device, dtype=x.dtype)
    write_state = return_state and s > 0
    if return_state and state_out is None:
        state_out = torch.empty((batch, c_in, s), device=x.device, dtype=x.dtype)
    if batch == 0:
        return (y, state_out) if return_state else y
    has_state = state is not None and s > 0
    has_snake = snake_alpha is not None
    has_lead = pre_start is not None and pre_start[1] > 0
    pos, lag, unit = pre_start if has_lead else (x, 0, 1)
    # unused pointers still need a valid tensor of the right kind; x is never dereferenced through them
    dummy = x
    st = state if has_state else dummy
    so = state_out if write_state else dummy
    st_strides = state.stride() if has_state else (0, 0, 0)
    so_strides = state_out.stride() if write_state else (0, 0, 0)
    common = dict(WIDTH=width, HAS_BIAS=bias is not None, HAS_STATE=has_state, HAS_SNAKE=has_snake,
                  WRITE_STATE=write_state, HAS_LEAD=has_lead, EPS=SNAKE_EPS, BLOCK_S=_BLOCK_S)
    args = (x, weight, bias if bias is not None else dummy, st,
            snake_alpha if has_snake else dummy, snake_beta if has_snake else dummy, y, so)
    if depthwise:
        bc, bt, warps = _dw_config(c_in, length, batch)
        grid = (max(triton.cdiv(length, bt), 1), triton.cdiv(c_in, bc), batch)
        _causal_conv1d_depthwise_kernel[grid](
            *args, pos, c_in, length, dilation, lag, unit,
            *x.stride(), weight.stride(0), weight.stride(2), *st_strides, *y.stride(), *so_strides,
            BLOCK_C=bc, BLOCK_T=bt, num_warps=warps, **common)
    else:
        bo, bc, bt, warps, auto_split = _dense_tiles(c_in, c_out, length, width, x.dtype, batch)
        tiles = max(triton.cdiv(length, bt), 1) * triton.cdiv(c_out, bo)
        split = auto_split if split is None else split
        grid = (max(triton.cdiv(length, bt), 1), triton.cdiv(c_out, bo) * split, batch)
        res = residual if residual is not None else dummy
        if split > 1:
            ws = torch.empty((split, batch, c_out, length), device=x.device, dtype=torch.float32)
            cnt = tile_counters(x.device, tiles * batch)
        else:
            ws, cnt = dummy, dummy
        _causal_conv1d_dense_kernel[grid](
            *args, res, pos, ws, cnt, c_in, c_out, length, dilation, lag, unit,
            *x.stride(), *weight.stride(), *st_strides, *y.stride(), *so_strides,
            *(residual.stride() if residual is not None else (0, 0, 0)),
            BLOCK_O=bo, BLOCK_C=bc, BLOCK_T=bt, num_warps=warps, num_stages=2, HAS_RES=residual is not None,
            SPLIT=split, **common)
    return (y, state_out) if return_state else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dilation: int = 1,
                  groups: int = 1, state: torch.Tensor | None = None, return_state: bool = False,
                  snake_alpha: torch.Tensor | None = None, snake_beta: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, state_out: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None,
                  pre_start: tuple[torch.Tensor, int, int] | None = None):
    """Causal (left-padded) stride-1 conv1d with carried state and optional fused SnakeBeta on the input.

    x: (batch, in_ch, length), any strides; weight: (out_ch, in_ch / groups, width); bias: (out_ch,);
    state: (batch, in_ch, (width - 1) * dilation) post-activation history, None = zeros (stream start);
    snake_alpha, snake_beta: (in_ch,) log-scale SnakeBeta parameters applied to x before the conv.
    residual: (batch, out_ch, length) added to the output (a residual unit's skip connection).
    pre_start: (pos (batch,) int64, lag, unit): x samples t < lag - pos[b]·unit read as zero (a streaming
    chunk's positions before a fresh stream's start, see models/code2wav.py).
    out / state_out: optional preallocated (batch, out_ch, length) / state-shaped outputs, any strides, for
    CUDA-graph static buffers; neither may overlap x or state (double-buffer the state across chunks). Returns y: (batch, out_ch, length), plus the new state when ``return_state``.
    Triton supports groups == 1 and depthwise (groups == in_ch == out_ch; no residual); the reference supports
    any groups.
    """
    _validate(x, weight, bias, dilation, groups, state, snake_alpha, snake_beta, out, state_out, residual,
              pre_start)
    if use_triton(x, weight):
        return _causal_conv1d_triton(x, weight, bias, dilation, groups, state, snake_alpha, snake_beta,
                                     return_state, out, state_out, residual, pre_start)
    res = causal_conv1d_ref(x, weight, bias, dilation, groups, state, return_state, snake_alpha, snake_beta,
                            residual=residual, pre_start=pre_start)
    if not return_state:
        return out.copy_(res) if out is not None else res
    y, new_state = res
    if out is not None:
        y = out.copy_(y)
    if state_out is not None:
        new_state = state_out.copy_(new_state)
    return y, new_state


# -------------------------------------------------------------------------------------------- reference
def snake_beta_ref(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """SnakeBeta with log-scale parameters. x: (batch, channels, length); alpha, beta: (channels,).

    Computed in fp32 and returned in x's dtype (matches transformers exactly in fp32)."""
    xf = x.float()
    a = torch.exp(alpha.float())[None, :, None]
    bt = torch.exp(beta.float())[None, :, None]
    return (xf + (1.0 / (bt + SNAKE_EPS)) * torch.pow(torch.sin(xf * a), 2)).to(x.dtype)


def zero_pre_start(x: torch.Tensor, pos: torch.Tensor, lag: int, unit: int) -> torch.Tensor:
    """x: (B, C, L) chunk whose sample t sits at stream index pos·unit − lag + t; zero negative indices."""
    if lag == 0:
        return x
    lead = (lag - pos * unit).clamp_min(0)  # (B,)
    keep = torch.arange(x.shape[-1], device=x.device)[None, :] >= lead[:, None]
    return x.masked_fill(~keep[:, None, :], 0)


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      dilation: int = 1, groups: int = 1, state: torch.Tensor | None = None,
                      return_state: bool = False, snake_alpha: torch.Tensor | None = None,
                      snake_beta: torch.Tensor | None = None, upcast: bool = True,
                      residual: torch.Tensor | None = None,
                      pre_start: tuple[torch.Tensor, int, int] | None = None):
    """Plain-PyTorch causal conv1d: ``F.conv1d`` on cat(state, act(x)) (see the module docstring).

    x: (batch, in_ch, length); weight: (out_ch, in_ch / groups, width); state: (batch, in_ch, (width-1)*dilation)
    or None (zeros). ``upcast`` runs the conv in fp32 (the activation is still rounded to x's dtype, as stored
    in the state); ``upcast=False`` runs it in x's dtype (the same-dtype torch baseline for error budgets).
    ``residual`` is added to the output; ``pre_start`` = (pos, lag, unit) zeroes x's pre-start samples first.
    Returns y: (batch, out_ch, length) in x's dtype, plus the new state when ``return_state``."""
    batch, c_in, _ = x.shape
    width = weight.shape[-1]
    s = (width - 1) * dilation
    if pre_start is not None:
        x = zero_pre_start(x, *pre_start)
    act = snake_beta_ref(x, snake_alpha, snake_beta) if snake_alpha is not None else x
    if state is None:
        state = torch.zeros((batch, c_in, s), device=x.device, dtype=x.dtype)
    xs = torch.cat([state.to(x.dtype), act], dim=-1)
    if upcast:
        y = F.conv1d(xs.float(), weight.float(), None if bias is None else bias.float(), dilation=dilation,
                     groups=groups)
        y = (y + residual.float() if residual is not None else y).to(x.dtype)
    else:
        y = F.conv1d(xs, weight, None if bias is None else bias.to(x.dtype), dilation=dilation, groups=groups)
        y = y + residual if residual is not None else y
    if not return_state:
        return y
    return y, xs[..., xs.shape[-1] - s:].contiguous()


# -------------------------------------------------------------------------------------- compile specs
def _specs() -> list[KernelSpec]:
    """One entry per shipped launch config: dense width 7 (dilation is a runtime arg) and width 1 for every
    Code2Wav conv, depthwise width 7 for the ConvNeXt block at one-frame and long lengths; fp16/bf16/fp32;
    with/without snake, state, the pre-start mask (streaming) and the fused residual (width 1)."""
    tname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    specs = []
    for dt in _DTYPES:
        t = tname[dt]
        ptrs = {n: f"*{t}" for n in ("x_ptr", "w_ptr", "bias_ptr", "state_ptr", "y_ptr", "so_ptr")}
        ptrs.update({"alpha_ptr": "*fp32", "beta_ptr": "*fp32"})
        dense_sig = dict(ptrs, res_ptr=f"*{t}", pos_ptr="*i64", ws_ptr="*fp32", cnt_ptr="*i32",
                         C_in="i32", C_out="i32", L="i32",
                         dilation="i32", lag="i32", unit="i32",
                         **{n: "i32" for n in ("sxb", "sxc", "sxt", "swo", "swi", "swk", "ssb", "ssc", "sst",
                                               "syb", "syc", "syt", "sob", "soc", "sot", "srb", "src", "srt")})
        # (name, width, snake, streaming state + pre-start mask, residual, c_in, c_out, length) per released
        # conv; one-frame lengths take the input-channel split their shapes get at batch 1
        dense_uses = [("res_conv7", 7, True, True, False, 768, 768, 32),
                      ("res_conv7_384", 7, True, True, False, 384, 384, 160),
                      ("res_conv7_192", 7, True, True, False, 192, 192, 640),
                      ("res_conv7_long", 7, True, True, False, 768, 768, 4096),
                      ("res_conv1", 1, True, False, True, 768, 768, 32),
                      ("res_conv1_long", 1, True, False, True, 768, 768, 4096),
                      ("in_conv_1024_1536", 7, False, True, False, 1024, 1536, 4),
                      ("out_conv_96_1", 7, True, True, False, 96, 1, 1920)]
        for name, width, snake, stream, res, c_in, c_out, length in dense_uses:
            bo, bc, bt, warps, split = _dense_tiles(c_in, c_out, length, width, dt, 1)
            specs.append(KernelSpec(
                name=f"causal_conv1d_dense_{name}_{t}", fn=_causal_conv1d_dense_kernel, signature=dense_sig,
                constexprs=dict(WIDTH=width, HAS_BIAS=True, HAS_STATE=stream, HAS_SNAKE=snake,
                                WRITE_STATE=stream, HAS_RES=res, HAS_LEAD=stream, EPS=SNAKE_EPS, SPLIT=split,
                                BLOCK_O=bo, BLOCK_C=bc, BLOCK_T=bt, BLOCK_S=_BLOCK_S),
                num_warps=warps, num_stages=2))
        dw_sig = dict(ptrs, pos_ptr="*i64", C="i32", L="i32", dilation="i32", lag="i32", unit="i32",
                      **{n: "i32" for n in ("sxb", "sxc", "sxt", "swc", "swk", "ssb", "ssc", "sst",
                                            "syb", "syc", "syt", "sob", "soc", "sot")})
        for stream, length in ((False, 4096), (True, 4), (True, 4096)):
            bc, bt, warps = _dw_config(1024, length, 1)   # the ConvNeXt blocks: 1024 channels
            specs.append(KernelSpec(
                name=f"causal_conv1d_depthwise_w7_{'stream' if stream else 'offline'}_L{length}_{t}",
                fn=_causal_conv1d_depthwise_kernel, signature=dw_sig,
                constexprs=dict(WIDTH=7, HAS_BIAS=True, HAS_STATE=stream, HAS_SNAKE=False, WRITE_STATE=stream,
                                HAS_LEAD=stream, EPS=SNAKE_EPS, BLOCK_C=bc, BLOCK_T=bt, BLOCK_S=_BLOCK_S),
                num_warps=warps, num_stages=2))
    return specs


COMPILE_SPECS: list[KernelSpec] = _specs()

"""Code2Wav: codec codes ``(batch, num_quantizers, frames)`` -> 24 kHz waveform, offline and exactly-streaming.

Pipeline (transformers ``Qwen3OmniMoeCode2Wav``): ``code_embedding(codes + q·codebook_size).mean(quantizers)``
-> causal sliding-window transformer (RMSNorm, RoPE, LayerScale, SwiGLU) -> per upsampling ratio
[CausalTransConv(k=s) + ConvNeXt(depthwise causal k7)] -> CausalConv(hidden -> decoder_dim, k7) -> per upsample
rate r [SnakeBeta -> CausalTransConv(k=2r, s=r) -> 3 residual units (dilation 1, 3, 9)] -> SnakeBeta ->
CausalConv(-> 1, k7) -> clamp(-1, 1).

Why streaming can be exact: every stage is causal, and the reference's transposed convs trim ``k - s`` samples
on *both* ends, so a decode of n frames ends exactly where the output stops depending on frame n+1. The
offline decode of n frames is therefore a prefix of the decode of any longer sequence:
``samples(n) = n·T - D`` with ``T = prod(rates)`` samples per frame and a fixed delay ``D`` obtained by
``d <- d·s + (k - s)`` over the transposed convs in order (released config: T = 1920, D = 555, so the first
frame gives 1365 samples and each later frame 1920).

The streaming step keeps one fixed lag per layer: a transposed conv emits ``s`` final samples per input
sample, which in offline coordinates start ``d`` samples before index 0 on a stream's first chunk. Those
leading "pre-start" positions hold junk; they are zeroed right before every conv that reads them (the
reference's left zero padding, and ``SnakeBeta(0) == 0``), so every real sample is exact and every chunk of n
frames has the static shape ``n·T`` per stream (``step_padded``); ``step`` trims the leading D on a first chunk.

State (``Code2WavState``) is a handful of tensors with a batch dim: the last ``sliding_window - 1`` rotated keys
and values per layer plus each stream's frame counter (streams may be at different positions), the last
``(k - 1)·dilation`` post-activation inputs of every causal conv, and the ``k - s`` output samples of every
overlapping transposed conv that later frames still add to. No past frame is recomputed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Code2WavConfig
from ..kernels import causal_conv1d as _cc
from ..kernels import trans_conv1d as _trans
from ..kernels.causal_conv1d import causal_conv1d, prepare_weight
from ..kernels.trans_conv1d import trans_conv1d
from ..kernels.window_attention import window_attention
from .layers import DenseMLP, RMSNorm, fuse_parts_on_load, make_linear, split

__all__ = ["Code2Wav", "Code2WavState", "StateLayout"]


# ----------------------------------------------------------------------------------------------- state
@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Per-stream shapes of the streaming state, packed in this order into one row of ``Code2WavState.data``.

    key: (layers, kv_heads, sliding_window - 1, head_dim) (value the same); conv: (in_ch, (width-1)·dilation)
    per causal conv with width > 1; tail: (out_ch, k - s) per overlapping transposed conv."""

    key: tuple[int, ...]
    conv: tuple[tuple[int, int], ...]
    tail: tuple[tuple[int, int], ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [self.key, self.key, *self.conv, *self.tail]

    @property
    def offsets(self) -> list[int]:
        out, o = [], 0
        for shp in self.shapes:
            out.append(o)
            o += math.prod(shp)
        return out + [o]

    @property
    def size(self) -> int:
        return self.offsets[-1]


@dataclasses.dataclass
class Code2WavState:
    """Streaming decoder state for ``batch`` streams: two tensors, so a slot pool gathers, scatters and copies
    it in two ops (a CUDA-graph step's state traffic is two copies, not one per conv).

    pos:  (batch,) int64 frames already decoded per stream.
    data: (batch, layout.size) model dtype, every other piece packed per stream; views of it:
      key, value: (layers, batch, kv_heads, sliding_window - 1, head_dim) rotated keys / values of the last
           ``sliding_window - 1`` positions (slots before position 0 are zeros and masked out);
      conv: per causal conv with width > 1, (batch, in_ch, (width - 1)·dilation) post-activation inputs;
      tail: per transposed conv with k > s, (batch, out_ch, k - s) partial output sums (bias not yet added).
    """

    pos: torch.Tensor
    data: torch.Tensor
    layout: StateLayout

    NAMES = ("pos", "data")

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def _view(self, i: int) -> torch.Tensor:
        o = self.layout.offsets
        return self.data[:, o[i]:o[i + 1]].view(self.batch, *self.layout.shapes[i])

    @property
    def key(self) -> torch.Tensor:
        return self._view(0).transpose(0, 1)

    @property
    def value(self) -> torch.Tensor:
        return self._view(1).transpose(0, 1)

    @property
    def conv(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._view(2 + i) for i in range(len(self.layout.conv)))

    @property
    def tail(self) -> tuple[torch.Tensor, ...]:
        n = 2 + len(self.layout.conv)
        return tuple(self._view(n + i) for i in range(len(self.layout.tail)))

    def select(self, index: torch.Tensor | Sequence[int]) -> "Code2WavState":
        """The sub-state of streams ``index`` (a copy)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)
        return Code2WavState(self.pos.index_select(0, idx), self.data.index_select(0, idx), self.layout)

    def scatter_(self, index: torch.Tensor | Sequence[int], src: "Code2WavState") -> "Code2WavState":
        """Write ``src`` (batch = len(index)) into streams ``index`` of this state in place (slot pools)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)
        self.pos.index_copy_(0, idx, src.pos)
        self.data.index_copy_(0, idx, src.data)
        return self

    def tensors(self) -> list[torch.Tensor]:
        """[pos, data], in the order of ``NAMES``."""
        return [self.pos, self.data]

    def copy_(self, src: "Code2WavState") -> "Code2WavState":
        """Overwrite this state with ``src`` in place (static buffers of a captured CUDA graph)."""
        self.pos.copy_(src.pos)
        self.data.copy_(src.data)
        return self

    def clone(self) -> "Code2WavState":
        return Code2WavState(self.pos.clone(), self.data.clone(), self.layout)

    @staticmethod
    def cat(states: Sequence["Code2WavState"]) -> "Code2WavState":
        """One batched state from several (streams may be at different positions)."""
        return Code2WavState(torch.cat([s.pos for s in states]), torch.cat([s.data for s in states]),
                             states[0].layout)


# ---------------------------------------------------------------------------------------- building blocks
class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


class _Attention(nn.Module):
    def __init__(self, c: Code2WavConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window
        # q, k and v in one GEMM (the checkpoint's q_proj/k_proj/v_proj, concatenated at load)
        self.qkv_proj = make_linear(c.hidden_size, (self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                                    self.kv_heads * self.head_dim))
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        fuse_parts_on_load(self)

    def forward(self, x, cos, sin, past_k, past_v, pos, new_k, new_v):
        """x: (B, n, hidden); cos/sin: (B, n, head_dim); past_k/v: (B, kv_heads, W-1, head_dim) rotated history;
        pos: (B,) int64 first position of the chunk. Writes the new history into new_k / new_v (same shape)
        and returns out (B, n, hidden). Rotary, the window update and the masked attention are one kernel
        (``kernels.window_attention``; its reference is this layer's former torch code)."""
        b, n, _ = x.shape
        q, k, v = split(self.qkv_proj(x), self.qkv_proj.parts)  # views of the fused projection
        q = q.view(b, n, self.heads, self.head_dim)
        k = k.view(b, n, self.kv_heads, self.head_dim)
        v = v.view(b, n, self.kv_heads, self.head_dim)
        o, _, _ = window_attention(q, k, v, cos, sin, past_k, past_v, pos, self.window, self.head_dim ** -0.5,
                                   new_k=new_k, new_v=new_v)
        return self.o_proj(o.reshape(b, n, -1))


class _TransformerLayer(nn.Module):
    def __init__(self, c: Code2WavConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = _Attention(c)
        self.self_attn_layer_scale = _LayerScale(c.hidden_size, c.layer_scale_initial_scale)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DenseMLP(c.hidden_size, c.intermediate_size)   # gate/up as one GEMM, silu·mul one kernel
        self.mlp_layer_scale = _LayerScale(c.hidden_size, c.layer_scale_initial_scale)

    def forward(self, x, pending, cos, sin, past_k, past_v, pos, new_k, new_v):
        """x: (B, n, hidden) residual stream; pending: the previous layer's (mlp output, its layer scale) still to
        be added, or None. Returns (x, pending) for the next layer: each layer-scaled residual add
        (x + scale·branch, one rounding like addcmul: equal to the reference up to its rounding of scale·branch)
        runs inside the RMSNorm that follows it."""
        h, x = (self.input_layernorm(x), x) if pending is None else self.input_layernorm(pending[0], x, pending[1])
        a = self.self_attn(h, cos, sin, past_k, past_v, pos, new_k, new_v)
        h, x = self.post_attention_layernorm(a, x, self.self_attn_layer_scale.scale)
        return x, (self.mlp(h), self.mlp_layer_scale.scale)


class _Transformer(nn.Module):
    def __init__(self, c: Code2WavConfig):
        super().__init__()
        self.layers = nn.ModuleList([_TransformerLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class _Snake(nn.Module):
    """SnakeBeta with log-scale alpha/beta: x + sin²(x·e^alpha) / (e^beta + 1e-9)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the conv kernel reads the (tiny) snake parameters as fp32
        return self.alpha.float(), self.beta.float()


class _CausalConv(nn.Module):
    """Stride-1 causal conv (left pad (k-1)·dilation); ``conv`` only holds the parameters."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, dilation=dilation, groups=groups)
        self.dilation, self.groups = dilation, groups
        self.state_len = (k - 1) * dilation
        self.slot = -1  # index into Code2WavState.conv, set by Code2Wav


class _TransConv(nn.Module):
    """Transposed conv (kernel k, stride s, k >= s) trimming k - s on each side (the reference's causal trim)."""

    def __init__(self, cin: int, cout: int, k: int, s: int):
        super().__init__()
        if not s <= k <= 2 * s:
            raise ValueError(f"transposed conv needs stride <= kernel <= 2·stride; got k={k}, s={s}")
        self.conv = nn.ConvTranspose1d(cin, cout, k, stride=s)
        self.stride, self.overlap = s, k - s
        self.slot = -1  # index into Code2WavState.tail when overlap > 0


class _ConvNeXt(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = _CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))


class _ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = _Snake(dim)
        self.conv1 = _CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = _Snake(dim)
        self.conv2 = _CausalConv(dim, dim, 1)


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([_Snake(cin), _TransConv(cin, cout, 2 * rate, rate),
                                    *(_ResidualUnit(cout, d) for d in (1, 3, 9))])


# ------------------------------------------------------------------------------------------------ model
class Code2Wav(nn.Module):
    """Codes -> waveform. Parameters are named as the checkpoint's ``code2wav.*`` minus that prefix.

    ``decode(codes)``: one exact causal decode; ``init_state`` / ``step`` / ``step_padded``: the streaming
    decoder (see the module docstring); the engine keeps many streams' states in one slot-indexed pool.
    """

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg
        self.code_embedding = nn.Embedding(c.codebook_size * c.num_quantizers, c.hidden_size)
        self.pre_transformer = _Transformer(c)
        self.upsample = nn.ModuleList([
            nn.ModuleList([_TransConv(c.hidden_size, c.hidden_size, f, f), _ConvNeXt(c.hidden_size)])
            for f in c.upsampling_ratios])
        dims = [c.decoder_dim // 2 ** i for i in range(len(c.upsample_rates) + 1)]
        self.decoder = nn.ModuleList(
            [_CausalConv(c.hidden_size, c.decoder_dim, 7)]
            + [_DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(c.upsample_rates)]
            + [_Snake(dims[-1]), _CausalConv(dims[-1], 1, 7)])
        for p in self.parameters():
            p.requires_grad_(False)

        self._convs = [m for m in self.modules() if isinstance(m, _CausalConv) and m.state_len > 0]
        for i, m in enumerate(self._convs):
            m.slot = i
        self._tconvs = [m for m in self.modules() if isinstance(m, _TransConv) and m.overlap > 0]
        for i, m in enumerate(self._tconvs):
            m.slot = i
        # Lag bookkeeping in execution order: upsampling ratios first, then the decoder's rates.
        self.samples_per_frame = c.total_upsample
        lag = 0
        for f in c.upsampling_ratios:
            lag = lag * f
        for r in c.upsample_rates:
            lag = lag * r + r
        self.delay = lag
        self.materialize_buffers(self.code_embedding.weight.device)

    # -- buffers / sizes ------------------------------------------------------------------------------------
    def materialize_buffers(self, device: torch.device | str) -> None:
        """Non-persistent buffers (code offsets, rotary inverse frequencies); called by the loader."""
        c = self.cfg
        self.register_buffer("code_offset", torch.arange(c.num_quantizers, device=device).view(1, -1, 1)
                             * c.codebook_size, persistent=False)
        dim = c.head_dim
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        _cc.tile_counters(device)  # the split convs' arrival counters, zeroed here rather than in a step
        if torch.device(device).type == "cuda":
            # the dense conv kernel's weight tiles load contiguously in (width, out, in) storage
            for m in self._convs + [m for m in self.modules() if isinstance(m, _CausalConv) and m.state_len == 0]:
                if m.groups == 1:
                    m.conv.weight = nn.Parameter(prepare_weight(m.conv.weight), requires_grad=False)
            for m in self.modules():
                if isinstance(m, _TransConv):  # (K, out, in) storage: contiguous tile loads along ``in``
                    m.conv.weight = nn.Parameter(_trans.prepare_weight(m.conv.weight), requires_grad=False)

    def num_samples(self, frames: int) -> int:
        """Samples one ``decode`` of ``frames`` frames returns: frames·T − D (0 for no frames)."""
        return max(frames * self.samples_per_frame - self.delay, 0)

    @property
    def first_frame_samples(self) -> int:
        return self.samples_per_frame - self.delay

    # -- streaming --------------------------------------------------------------------------------------------
    @property
    def state_layout(self) -> StateLayout:
        c = self.cfg
        return StateLayout(key=(c.num_hidden_layers, c.num_key_value_heads, c.sliding_window - 1, c.head_dim),
                           conv=tuple((m.conv.in_channels, m.state_len) for m in self._convs),
                           tail=tuple((m.conv.out_channels, m.overlap) for m in self._tconvs))

    def init_state(self, batch: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Code2WavState:
        """Zero state for ``batch`` fresh streams (zeros are exactly the reference's left padding)."""
        w = self.code_embedding.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        layout = self.state_layout
        return Code2WavState(torch.zeros(batch, dtype=torch.long, device=device),
                             torch.zeros((batch, layout.size), device=device, dtype=dtype), layout)

    @torch.inference_mode()
    def step_padded(self, codes: torch.Tensor, state: Code2WavState) -> tuple[torch.Tensor, Code2WavState]:
        """Decode ``n`` more frames per stream with static shapes (graph-capturable; no host syncs).

        codes: (batch, num_quantizers, n) int64. Returns (audio (batch, n·T), new state). For a stream whose
        ``state.pos`` was 0, the first ``self.delay`` samples precede the waveform's start and must be dropped;
        every other sample is final and exact. ``state`` is not modified: every piece of the new state is written
        straight into its view of one fresh buffer by the op that produces it (no gather/copy per conv).
        """
        self._check_codes(codes)
        if codes.shape[0] != state.batch:
            raise ValueError(f"codes batch {codes.shape[0]} != state batch {state.batch}")
        pos = state.pos
        new = Code2WavState(pos + codes.shape[-1], torch.empty_like(state.data), state.layout)
        x = self._transformer(codes, pos, state.key, state.value, new.key, new.value)
        conv_in, tail_in = state.conv, state.tail
        conv_out, tail_out = new.conv, new.tail

        def conv(m: _CausalConv, h, lag, unit, snake: _Snake | None = None, residual=None):
            alpha, beta = snake.params() if snake is not None else (None, None)
            if m.state_len == 0:  # pointwise: junk stays in the pre-start positions
                return causal_conv1d(h, m.conv.weight, m.conv.bias, m.dilation, m.groups,
                                     snake_alpha=alpha, snake_beta=beta, residual=residual)
            y, _ = causal_conv1d(h, m.conv.weight, m.conv.bias, m.dilation, m.groups, state=conv_in[m.slot],
                                 return_state=True, snake_alpha=alpha, snake_beta=beta,
                                 state_out=conv_out[m.slot], residual=residual, pre_start=(pos, lag, unit))
            return y

        def tconv(m: _TransConv, h, lag, unit, snake: _Snake | None = None):
            alpha, beta = snake.params() if snake is not None else (None, None)
            y, _ = trans_conv1d(h, m.conv.weight, m.conv.bias, m.stride,
                                tail=tail_in[m.slot] if m.overlap else None, snake_alpha=alpha, snake_beta=beta,
                                pre_start=(pos, lag, unit), tail_out=tail_out[m.slot] if m.overlap else None)
            return y

        h = x.transpose(1, 2)  # (B, hidden, n)
        lag, unit = 0, 1  # lag: pre-start samples at a fresh stream's chunk head; unit: samples per frame
        for tc, cnx in self.upsample:
            h = tconv(tc, h, lag, unit)
            lag, unit = lag * tc.stride + tc.overlap, unit * tc.stride
            r = conv(cnx.dwconv, h, lag, unit).transpose(1, 2)
            r = cnx.pwconv2(F.gelu(cnx.pwconv1(cnx.norm(r))))
            h = torch.addcmul(h, cnx.gamma[:, None], r.transpose(1, 2))
        h = conv(self.decoder[0], h, lag, unit)
        for blk in self.decoder[1:-2]:
            act, tc, *units = blk.block
            h = tconv(tc, h, lag, unit, snake=act)
            lag, unit = lag * tc.stride + tc.overlap, unit * tc.stride
            for u in units:
                r = conv(u.conv1, h, lag, unit, snake=u.act1)
                h = conv(u.conv2, r, lag, unit, snake=u.act2, residual=h)
        wav = conv(self.decoder[-1], h, lag, unit, snake=self.decoder[-2])
        return wav.clamp(-1, 1).squeeze(1), new

    def step(self, codes: torch.Tensor, state: Code2WavState) -> tuple[torch.Tensor, Code2WavState]:
        """Decode ``n`` more frames per stream; returns (audio (batch, samples), new state).

        samples = n·T − D if the streams are fresh (state.pos == 0), else n·T: the concatenation of a stream's
        outputs equals ``decode`` of all its codes. All streams of one call must be either fresh or not (one
        host sync checks it); mixed batches use ``step_padded``.
        """
        fresh = int((state.pos == 0).sum())
        if 0 < fresh < state.batch:
            raise ValueError("step: batch mixes fresh and running streams (output lengths differ); "
                             "use step_padded and drop the first `delay` samples of the fresh ones")
        audio, new = self.step_padded(codes, state)
        return (audio[:, self.delay:] if fresh else audio), new

    # -- offline ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Exact causal decode of whole sequences. codes: (batch, num_quantizers, frames) int64 ->
        (batch, frames·T − D) in [-1, 1]. ``chunk_frames`` bounds activation memory by decoding through the
        streaming state that many frames at a time (same result); None decodes in one pass."""
        self._check_codes(codes)
        b, _, n = codes.shape
        w = self.code_embedding.weight
        if n == 0:
            return torch.zeros((b, 0), device=w.device, dtype=w.dtype)
        state = self.init_state(b)
        step = n if chunk_frames is None else chunk_frames
        if step < 1:
            raise ValueError(f"chunk_frames must be >= 1; got {chunk_frames}")
        out = []
        for a in range(0, n, step):
            audio, state = self.step_padded(codes[..., a:a + step], state)
            out.append(audio)
        return torch.cat(out, dim=-1)[:, self.delay:]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)

    # -- internals --------------------------------------------------------------------------------------------
    def _check_codes(self, codes: torch.Tensor) -> None:
        q = self.cfg.num_quantizers
        if codes.dim() != 3 or codes.shape[1] != q:
            raise ValueError(f"codes must be (batch, {q}, frames); got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor; got {codes.dtype}")

    def _transformer(self, codes, pos, past_k, past_v, new_k, new_v):
        """codes: (B, Q, n) -> hidden (B, n, hidden); the new last ``W - 1`` keys/values of every layer are
        written into new_k / new_v (layers, B, kv_heads, W-1, head_dim), views of the new state."""
        n = codes.shape[-1]
        x = self.code_embedding(codes + self.code_offset).mean(1)
        qpos = pos[:, None] + torch.arange(n, device=pos.device)
        # angles for exactly the positions in use (no table caps the stream length); fp32 as the reference;
        # built once per step, shared by every layer
        freqs = qpos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        pending = None
        for i, layer in enumerate(self.pre_transformer.layers):
            x, pending = layer(x, pending, cos, sin, past_k[i], past_v[i], pos, new_k[i], new_v[i])
        if pending is None:   # no layers
            return self.pre_transformer.norm(x)
        return self.pre_transformer.norm(pending[0], x, pending[1])[0]

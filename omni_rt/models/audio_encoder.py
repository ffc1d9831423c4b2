"""AuT, Qwen3-Omni's audio encoder: log-mel -> conv downsampling per chunk -> windowed transformer -> projector.

Reference: transformers ``modeling_qwen3_omni_moe.py`` (5.23.0) ``Qwen3OmniMoeAudioEncoder`` (M:652-857).

What it computes, per audio of ``n`` mel frames (100 frames per second):
  * the frames are cut into chunks of ``2 * n_window`` = 100 frames (the last one partial), every chunk is
    zero-padded to 100 frames and goes through 3x (Conv2d 3x3 stride 2 + GELU): 128 mels x 100 frames ->
    C x 16 x 13, then ``conv_out`` (C*16 -> d_model); sinusoidal positions restart at 0 in every chunk;
    a partial chunk keeps only its first ``num_audio_tokens(len)`` tokens;
  * the tokens go through the transformer layers; attention is bidirectional inside windows of
    ``n_window_infer / (2 * n_window)`` chunks (104 tokens released, 26 in the tiny config), counted from the
    start of each audio, the last window of an audio holding the remainder;
  * ln_post -> proj1 -> GELU -> proj2.

Every window is independent of every other one through the whole stack (attention never crosses a window,
everything else is per token), so the encoder runs in *passes* of whole windows of at most
``max(conv_chunksize, chunks per window)`` chunks and writes each pass's tokens into the output. Working
memory is therefore bounded by one pass whatever the audio length (a 40-minute clip is 2400 chunks); only
the output grows with the input. The reference instead pads and convolves every chunk of the batch at once.

Padding: transformers zero-pads every chunk to the longest chunk of its batch. We pad each audio's chunks to
that audio's own longest chunk: 100 frames for an audio of >= 1 s (its first chunk is full), its whole length
for a shorter one. This equals the reference for an audio encoded alone (how its processor and our engine
encode a request's audio), and keeps every audio's tokens independent of what it is batched with (in a
reference batch the padding border of a sub-second clip moves with its neighbours).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioEncoderConfig
from ..kernels.block_window_attention import block_window_attention
from ..sampling import to_device
from .layers import fuse_parts_on_load, make_linear, split

__all__ = ["AudioEncoder", "num_audio_tokens"]

# transformers hard-codes 13 tokens per full chunk (M:149); it is what 3 stride-2 convs make of 100 frames.
_TOKENS_PER_FULL_CHUNK = 13


def _conv_out_len(n: int) -> int:
    """Length after one Conv2d(kernel 3, stride 2, padding 1)."""
    return (n - 1) // 2 + 1


def num_audio_tokens(num_mel_frames: int, n_window: int = 50) -> int:
    """Audio tokens the encoder emits for ``num_mel_frames`` frames (transformers' ``_get_feat_extract_output_lengths``).

    13 per full chunk of ``2 * n_window`` frames, plus what the three convs leave of the partial last chunk.
    """
    if num_mel_frames < 0:
        raise ValueError(f"num_mel_frames must be >= 0, got {num_mel_frames}")
    chunk = 2 * n_window
    leave = num_mel_frames % chunk
    # Python's floor division matches torch's on the reference's (leave - 1) when leave == 0: 0 tokens.
    tail = ((((leave - 1) // 2 + 1) - 1) // 2 + 1 - 1) // 2 + 1
    return tail + (num_mel_frames // chunk) * _TOKENS_PER_FULL_CHUNK


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Chunks [c0, c1) of audio ``audio`` taken by one pass."""

    audio: int
    c0: int
    c1: int


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One group of whole windows encoded together: its chunks, its windows' token counts, its output rows."""

    segments: tuple[_Segment, ...]
    chunk_tokens: tuple[int, ...]   # valid tokens of each chunk in the pass, in order
    window_tokens: tuple[int, ...]  # tokens of each window in the pass, in order
    token_start: int                # first output row of the pass

    @property
    def num_tokens(self) -> int:
        return sum(self.window_tokens)


class _Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        # q, k and v in one GEMM, biases too (the checkpoint's q/k/v_proj weights and biases, concatenated at load)
        self.qkv_proj = make_linear(d_model, (d_model, d_model, d_model), bias=True)
        self.out_proj = nn.Linear(d_model, d_model, bias=True)
        fuse_parts_on_load(self)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """x: (tokens, d_model); cu_seqlens: (windows + 1,) int32 on x's device; max_seqlen: the longest window,
        known on the host from the chunk plan (so the kernel never reads cu_seqlens back). → (tokens, d_model)."""
        n = x.shape[0]
        q, k, v = (p.view(n, self.heads, self.head_dim) for p in split(self.qkv_proj(x), self.qkv_proj.parts))
        o = block_window_attention(q, k, v, cu_seqlens, scale=self.head_dim ** -0.5, max_seqlen=max_seqlen)
        return self.out_proj(o.reshape(n, self.heads * self.head_dim))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = _Attention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
        """x: (tokens, d_model) -> (tokens, d_model), pre-norm attention + pre-norm GELU MLP."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens, max_seqlen)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            # As the reference: keep fp16 activations finite so the next LayerNorm does not see inf.
            clamp = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-clamp, clamp)
        return x


class AudioEncoder(nn.Module):
    """AuT. Parameter names equal the checkpoint's ``thinker.audio_tower.*`` names minus that prefix.

    Build on the meta device and load with ``assign_parameters(m, weights, prefix="thinker.audio_tower.")``,
    or build on a real device for random-weight experiments.
    """

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if cfg.activation_function != "gelu":
            raise ValueError(f"AuT supports activation_function 'gelu', got {cfg.activation_function!r}")
        if cfg.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {cfg.d_model}")
        chunk = 2 * cfg.n_window
        conv_tokens = _conv_out_len(_conv_out_len(_conv_out_len(chunk)))
        if conv_tokens != _TOKENS_PER_FULL_CHUNK:
            # The reference's token count is hard-coded for 100-frame chunks; any other n_window would make
            # its lengths disagree with its own conv output.
            raise ValueError(f"n_window must give {_TOKENS_PER_FULL_CHUNK} tokens per chunk like the reference "
                             f"(n_window 50), got n_window {cfg.n_window} -> {conv_tokens}")
        self.cfg = cfg
        self.chunk_frames = chunk
        self.tokens_per_chunk = conv_tokens
        self.chunks_per_window = cfg.n_window_infer // chunk
        c = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1)
        freq = _conv_out_len(_conv_out_len(_conv_out_len(cfg.num_mel_bins)))
        self.conv_out = nn.Linear(c * freq, cfg.d_model, bias=False)
        self.layers = nn.ModuleList([_EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)
        self._positions: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for p in self.parameters():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- buffers
    def materialize_buffers(self, device: torch.device | str) -> None:
        """Build the per-chunk sinusoid table (not in checkpoints) on ``device`` after weights are assigned."""
        self._positions.clear()
        self._chunk_positions(torch.device(device), self.conv_out.weight.dtype)

    def _chunk_positions(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(tokens_per_chunk, d_model): Whisper sinusoids for positions 0..12, which restart in every chunk.

        Computed for the chunk length only (the reference slices a 1500-row table to 13 rows), in fp32 on the
        CPU exactly as the reference does, then cast like the reference casts to the activations' dtype.
        """
        key = (device, dtype)
        table = self._positions.get(key)
        if table is None:
            channels = self.cfg.d_model
            log_increment = math.log(10000) / (channels // 2 - 1)
            inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2).float())
            scaled = torch.arange(self.tokens_per_chunk)[:, None] * inv_timescales[None, :]
            table = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1).to(device=device, dtype=dtype)
            self._positions[key] = table
        return table

    # ---------------------------------------------------------------- planning (host side)
    def num_audio_tokens(self, num_mel_frames: int) -> int:
        """Tokens this encoder emits for an audio of ``num_mel_frames`` mel frames."""
        return num_audio_tokens(num_mel_frames, self.cfg.n_window)

    def _windows(self, frames: int) -> list[tuple[int, int]]:
        """Chunk ranges [c0, c1) of one audio's attention windows, exactly the reference's cu_seqlens.

        The reference cuts ``num_audio_tokens(frames)`` into windows of 13 * chunks_per_window tokens, the
        last one the remainder; full chunks are 13 tokens, so every boundary falls between chunks.
        """
        chunks = -(-frames // self.chunk_frames)
        per = self.chunks_per_window
        return [(c, min(c + per, chunks)) for c in range(0, chunks, per)]

    def _chunk_tokens(self, frames: int, chunk: int) -> int:
        start = chunk * self.chunk_frames
        return self.num_audio_tokens(min(self.chunk_frames, frames - start))

    def plan(self, feature_lens: Sequence[int]) -> list[_Pass]:
        """Group every audio's windows, in order, into passes of at most ``max(conv_chunksize, chunks per
        window)`` chunks."""
        budget = max(self.cfg.conv_chunksize, self.chunks_per_window)
        passes: list[_Pass] = []
        segments: list[_Segment] = []
        chunk_tokens: list[int] = []
        window_tokens: list[int] = []
        used = token_start = 0

        def flush() -> None:
            nonlocal segments, chunk_tokens, window_tokens, used, token_start
            if window_tokens:
                p = _Pass(tuple(segments), tuple(chunk_tokens), tuple(window_tokens), token_start)
                passes.append(p)
                token_start += p.num_tokens
            segments, chunk_tokens, window_tokens, used = [], [], [], 0

        for audio, frames in enumerate(feature_lens):
            for c0, c1 in self._windows(frames):
                if used + (c1 - c0) > budget:
                    flush()
                if segments and segments[-1].audio == audio and segments[-1].c1 == c0:
                    segments[-1] = _Segment(audio, segments[-1].c0, c1)
                else:
                    segments.append(_Segment(audio, c0, c1))
                toks = [self._chunk_tokens(frames, c) for c in range(c0, c1)]
                chunk_tokens.extend(toks)
                window_tokens.append(sum(toks))
                used += c1 - c0
        flush()
        return passes

    # ---------------------------------------------------------------- compute
    def _padded_chunks(self, audios: list[torch.Tensor], segments: Sequence[_Segment], n_chunks: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """(chunks, 1, num_mel_bins, 100): the segments' chunks, zero-padded to full length, in ``dtype``."""
        mel, L = self.cfg.num_mel_bins, self.chunk_frames
        device = audios[segments[0].audio].device
        buf = torch.zeros((n_chunks, mel, L), dtype=dtype, device=device)
        row = 0
        for s in segments:
            x = audios[s.audio]
            frames = x.shape[1]
            full = max(0, min(s.c1, frames // L) - s.c0)
            if full:
                # (mel, full*100) -> (full, mel, 100): the reference's ``input_features.T.split`` per chunk.
                buf[row:row + full].copy_(x[:, s.c0 * L:(s.c0 + full) * L].reshape(mel, full, L).transpose(0, 1))
            if s.c0 + full < s.c1:  # the audio's partial last chunk
                start = (s.c0 + full) * L
                buf[row + full, :, :frames - start].copy_(x[:, start:frames])
            row += s.c1 - s.c0
        return buf.unsqueeze(1)

    def _embed(self, chunks: torch.Tensor, chunk_tokens: Sequence[int]) -> torch.Tensor:
        """chunks: (n, 1, mel, 100) -> (valid tokens, d_model): conv stack, conv_out, per-chunk positions."""
        outs = []
        gelu_ = torch.ops.aten.gelu_
        for part in chunks.split(self.cfg.conv_chunksize, dim=0):
            # GELU in place: the first conv's output is the largest tensor of a pass (released: 500 chunks x
            # 480 x 64 x 50), and an out-of-place GELU would hold it twice.
            h = gelu_(self.conv2d1(part))
            h = gelu_(self.conv2d2(h))
            h = gelu_(self.conv2d3(h))
            b, c, f, t = h.shape
            h = self.conv_out(h.permute(0, 3, 1, 2).reshape(b, t, c * f))
            outs.append(h + self._chunk_positions(h.device, h.dtype)[:t])
        h = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        n, t, d = h.shape
        h = h.reshape(n * t, d)
        if all(k == t for k in chunk_tokens):
            return h
        valid = to_device([c * t + i for c, k in enumerate(chunk_tokens) for i in range(k)], torch.long, h.device)
        return h.index_select(0, valid)

    def _encode_pass(self, audios: list[torch.Tensor], p: _Pass) -> torch.Tensor:
        """(pass tokens, output_dim) for one pass of whole windows."""
        dtype = self.conv2d1.weight.dtype
        parts: list[torch.Tensor] = []
        run: list[_Segment] = []
        run_tokens: list[int] = []
        k = 0
        for s in p.segments:
            n = s.c1 - s.c0
            tokens = list(p.chunk_tokens[k:k + n])
            k += n
            x = audios[s.audio]
            if x.shape[1] < self.chunk_frames:
                # A sub-second audio is one partial chunk, padded (by nothing) to its own length as the
                # reference pads it: its conv output is exactly its valid tokens.
                if run:
                    parts.append(self._embed(self._padded_chunks(audios, run, len(run_tokens), dtype), run_tokens))
                    run, run_tokens = [], []
                parts.append(self._embed(x.to(dtype)[None, None], tokens))
            else:
                run.append(s)
                run_tokens.extend(tokens)
        if run:
            parts.append(self._embed(self._padded_chunks(audios, run, len(run_tokens), dtype), run_tokens))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        bounds = [0]
        for n in p.window_tokens:
            bounds.append(bounds[-1] + n)
        cu = to_device(bounds, torch.int32, h.device)
        longest = max(p.window_tokens)   # from the host-side chunk plan: no per-layer read-back of cu_seqlens
        for layer in self.layers:
            h = layer(h, cu, longest)
        return self.proj2(F.gelu(self.proj1(self.ln_post(h))))

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Encode several audios in one call.

        features: either the concatenation of every audio's log-mel along time, ``(num_mel_bins, sum(frames))``
            (what transformers' thinker passes its audio tower), or a padded batch ``(batch, num_mel_bins,
            max_frames)`` where audio i is ``features[i, :, :feature_lens[i]]``.
        feature_lens: (batch,) mel frames per audio (tensor or ints); 0 gives no tokens.
        Returns (sum_i num_audio_tokens(feature_lens[i]), output_dim), audio after audio, in the weights' dtype.
        """
        lens = [int(n) for n in (feature_lens.tolist() if torch.is_tensor(feature_lens) else feature_lens)]
        mel = self.cfg.num_mel_bins
        if any(n < 0 for n in lens):
            raise ValueError(f"feature_lens must be >= 0, got {lens}")
        if features.dim() == 2:
            if features.shape[0] != mel or features.shape[1] != sum(lens):
                raise ValueError(f"features must be (num_mel_bins={mel}, sum(feature_lens)={sum(lens)}), got "
                                 f"{tuple(features.shape)}")
            offsets = [0]
            for n in lens:
                offsets.append(offsets[-1] + n)
            audios = [features[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        elif features.dim() == 3:
            if features.shape[0] != len(lens) or features.shape[1] != mel or max(lens, default=0) > features.shape[2]:
                raise ValueError(f"padded features must be (batch={len(lens)}, num_mel_bins={mel}, >= "
                                 f"{max(lens, default=0)} frames), got {tuple(features.shape)}")
            audios = [features[i, :, :n] for i, n in enumerate(lens)]
        else:
            raise ValueError(f"features must be (num_mel_bins, frames) or (batch, num_mel_bins, frames), got "
                             f"{tuple(features.shape)}")

        passes = self.plan(lens)
        total = sum(self.num_audio_tokens(n) for n in lens)
        out = torch.empty((total, self.cfg.output_dim), dtype=self.proj2.weight.dtype, device=features.device)
        for p in passes:
            out[p.token_start:p.token_start + p.num_tokens] = self._encode_pass(audios, p)
        return out

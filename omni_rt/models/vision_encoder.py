"""The vision encoder (``thinker.visual``): a ViT over 16×16×2 patches with learned position embeddings
interpolated to each grid, 2-D rotary attention within each frame, a 2×2 patch merger into the thinker's width,
and deepstack mergers tapping intermediate layers.

Parameter names equal the checkpoint's ``thinker.visual.*`` minus that prefix. Shapes (released config):
patches (N, 3·2·16·16 = 1536) → hidden (N, 1152) → merged (N/4, 2048); deepstack taps (N/4, 2048) each.
Rows arrive in the processor's order (t, h/2, w/2, 2, 2), so each 2×2 merge cell is 4 consecutive rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionEncoderConfig
from ..kernels import use_triton
from ..kernels.block_window_attention import block_window_attention


def _grid_list(grid_thw: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else [list(g) for g in grid_thw]
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def merge_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) patch coordinates of one frame's rows in merge-block order (h/m, w/m, m, m), each (h·w,)."""
    hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    return hpos.permute(0, 2, 1, 3).reshape(-1), wpos.permute(0, 2, 1, 3).reshape(-1)


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_corners=True bilinear taps/weights of ``index`` (0..size-1) into a ``side``-long table, as
    transformers' ``_interpolation_axis_taps_weights`` computes them (fp32)."""
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class _Attention(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        """x: (N, hidden); cos / signed sin: (N, head_dim) fp32 (see ``_rotate``); cu_seqlens: (frames + 1,)
        int32 → (N, hidden)."""
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.heads, self.head_dim)
        q, k = _rotate(qkv[:, :2], cos, sin).unbind(1)   # q and k rotated in one pass
        v = qkv[:, 2]
        if use_triton(q, k, v, cu_seqlens):
            o = block_window_attention(q, k, v, cu_seqlens, scale=self.head_dim ** -0.5, max_seqlen=max_seqlen)
        else:
            o = _frame_attention_sdpa(q, k, v, cu_seqlens)
        return self.proj(o.reshape(n, -1))


def _frame_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
                          ) -> torch.Tensor:
    """CPU path: one SDPA per frame (memory-efficient, unlike materialising a frame's full score matrix, which
    is 16·3600² floats for one 1280×720 image); transformers' sdpa path loops over frames the same way."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            qw, kw, vw = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(qw, kw, vw)[0].transpose(0, 1)
    return out


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (N, head_dim) → [-sin1 | sin2]: the sign of rotate_half moved onto the table, once per forward."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary in fp32 (as the reference), back to x's dtype. x: (N, ..., head_dim); tables (N, head_dim).

    The reference's ``x·cos + [-x2 | x1]·sin`` equals ``x·cos + [x2 | x1]·[-sin1 | sin2]`` bit for bit (a sign
    flip is exact), which saves the per-layer negation; q and k come in together (N, 2, heads, head_dim)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    swapped = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return (xf * cos.view(shape) + swapped * signed_sin.view(shape)).to(x.dtype)


class _MLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class _Block(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = _Attention(cfg)
        self.mlp = _MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm → gather each 2×2 cell (4 consecutive rows) → Linear → GELU → Linear.

    ``postshuffle`` (the deepstack mergers) normalises over the gathered 4·hidden, the final merger over hidden.
    """

    def __init__(self, cfg: VisionEncoderConfig, postshuffle: bool):
        super().__init__()
        self.merged = cfg.merged_size
        self.postshuffle = postshuffle
        self.ln_q = nn.LayerNorm(self.merged if postshuffle else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleList([nn.Linear(self.merged, self.merged), nn.GELU(),
                                  nn.Linear(self.merged, cfg.out_hidden_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, hidden) → (N / merge², out_hidden)."""
        x = self.ln_q(x.reshape(-1, self.merged)) if self.postshuffle else self.ln_q(x).reshape(-1, self.merged)
        for layer in self.mlp:
            x = layer(x)
        return x


class _PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 16, 16) over one patch per row, i.e. a Linear on the flat patch."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.hidden = cfg.hidden_size
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=(
            cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), stride=(
            cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.view(self.hidden, -1), self.proj.bias)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings ** 0.5)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def _inv_freq(self, device) -> torch.Tensor:
        """Axial rope: the same head_dim/4 frequencies for rows and columns (computed here, not a buffer, so a
        model built on the meta device needs nothing materialised)."""
        spatial = self.cfg.head_dim // 2
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=device)
                                              / spatial))

    def num_tokens(self, grid_thw) -> list[int]:
        m2 = self.cfg.spatial_merge_size ** 2
        return [t * h * w // m2 for t, h, w in _grid_list(grid_thw)]

    def _grid_tables(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, ...]:
        """Per patch: interpolated-position gather indices/weights (N, 4), rotary (row, col) (N, 2); per frame
        cu_seqlens (frames + 1,) int32. Computed on the host from the grid sizes (no device sync)."""
        m = self.cfg.spatial_merge_size
        idx, wts, pos, lens = [], [], [], []
        for t, h, w in grids:
            if h % m or w % m:
                raise ValueError(f"grid {t}×{h}×{w}: height and width must be multiples of the merge size {m}")
            row, col = merge_order(h, w, m)
            ht, hw_ = _bilinear_taps(row, h, self.side)
            wt, ww = _bilinear_taps(col, w, self.side)
            idx.append((ht[:, :, None] * self.side + wt[:, None, :]).reshape(-1, 4).repeat(t, 1))
            wts.append((hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4).repeat(t, 1))
            pos.append(torch.stack([row, col], dim=-1).repeat(t, 1))
            lens.extend([h * w] * t)
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
        return (torch.cat(idx).to(device), torch.cat(wts).to(device), torch.cat(pos).to(device), cu.to(device),
                max(lens))

    def forward(self, pixel_values: torch.Tensor, grid_thw, deepstack: bool = True
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values: (N, patch_dim) rows in processor order for all media; grid_thw: (n, 3).

        Returns (merged (N / merge², out_hidden), [deepstack tap (N / merge², out_hidden) per tap layer]).
        Attention is bidirectional within each frame (t·h·w patches form t frames of h·w), never across.
        """
        grids = _grid_list(grid_thw)
        n = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != n or pixel_values.shape[1] != self.cfg.patch_dim:
            raise ValueError(f"pixel_values must be ({n}, {self.cfg.patch_dim}) for grids {grids}, got "
                             f"{tuple(pixel_values.shape)}")
        device = self.pos_embed.weight.device
        idx, wts, pos, cu, max_len = self._grid_tables(grids, device)
        x = self.patch_embed(pixel_values.to(device))
        x = x + (self.pos_embed(idx) * wts[:, :, None].to(x.dtype)).sum(1)
        freqs = pos[..., None].float() * self._inv_freq(device)  # (N, 2, head_dim/4)
        emb = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([emb, emb], dim=-1)
        cos, sin = emb.cos(), _signed_sin(emb.sin())
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu, max_len)
            if deepstack and i in self.cfg.deepstack_visual_indexes:
                taps.append(self.merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), taps

    def encode(self, media: Sequence[tuple[torch.Tensor, tuple[int, int, int]]], dtype: torch.dtype,
               max_patches: int = 16384) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Encode several media (pixel_values (t·h·w, patch_dim) on any device, grid) in calls of at most
        ``max_patches`` patches: images are batched together, a long video is split between frames (attention
        never crosses a frame, so the split changes nothing). Returns per medium its merged features
        (tokens, out_hidden) and its deepstack taps [(tokens, out_hidden)] in this module's device/dtype."""
        device = self.pos_embed.weight.device
        outs: list[list[torch.Tensor]] = [[] for _ in media]
        taps: list[list[list[torch.Tensor]]] = [[[] for _ in self.cfg.deepstack_visual_indexes] for _ in media]
        # Work units: (medium index, row range, grid of that range); frames of one medium stay in order.
        units = []
        for i, (pv, (t, h, w)) in enumerate(media):
            per = max(1, max_patches // (h * w))
            for s in range(0, t, per):
                k = min(per, t - s)
                units.append((i, s * h * w, (s + k) * h * w, (k, h, w)))
        batch: list = []
        size = 0

        def flush():
            nonlocal batch, size
            if not batch:
                return
            pv = torch.cat([media[i][0][a:b] for i, a, b, _ in batch]).to(device=device, dtype=dtype)
            merged, deep = self(pv, [g for *_, g in batch])
            m2 = self.cfg.spatial_merge_size ** 2
            off = 0
            for i, a, b, _ in batch:
                n = (b - a) // m2
                outs[i].append(merged[off: off + n])
                for j, d in enumerate(deep):
                    taps[i][j].append(d[off: off + n])
                off += n
            batch, size = [], 0

        for unit in units:
            rows = unit[2] - unit[1]
            if batch and size + rows > max_patches:
                flush()
            batch.append(unit)
            size += rows
        flush()
        return [torch.cat(o) for o in outs], [[torch.cat(x) for x in t] for t in taps]

"""The code predictor (MTP): a small dense decoder that adds codebooks 1..G-1 to each talker frame.

Reference: transformers ``Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`` and the frame step in
``Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation``. Per frame the input is
``[talker last hidden (post-norm) of the previous position, talker codec_embedding(code0)]`` at positions 0, 1;
``lm_head[0]`` on the last position predicts code 1; then for j = 1..G-2 the model is fed
``codec_embedding[j-1](code j)`` at position j+1 and ``lm_head[j]`` predicts code j+1. The next talker input is
the sum of all G code embeddings (talker ``codec_embedding`` for code 0, ``codec_embedding[j-1]`` for code j).

The frame loop here has static shapes and no host synchronisation: a contiguous per-frame KV workspace of G
positions (``FrameWorkspace``), python-int step indices (constants under graph capture), and the sampler's tensor
path. Rows of a batch are independent frames (different requests), all at the same in-frame step.

Parameter names (under ``talker.code_predictor.``): ``model.layers.N.*``, ``model.norm``,
``model.codec_embedding.{0..G-2}``, ``lm_head.{0..G-2}``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodePredictorConfig
from ..kernels.qk_norm_rope import qk_norm_rope
from ..sampling import SamplingTensors, sample
from .layers import DenseMLP, RMSNorm, Rotary, fuse_parts_on_load, make_linear, split

# The residual codes' fixed sampling whenever the talker samples (reference prepare_inputs_for_generation:
# top_k 50, top_p 0.8, temperature 1; greedy when the talker is greedy). The seed is the talker's, salted so
# the two draws of one step are independent.
CP_TOP_K, CP_TOP_P, CP_TEMPERATURE = 50, 0.8, 1.0
CP_SEED_SALT = 0x5DEECE66D


@dataclasses.dataclass
class FrameWorkspace:
    """Preallocated per-frame KV: k/v (layers, B, kv_heads, G, head_dim). Reused frame after frame (each frame
    overwrites positions 0.. before reading them, so no clearing is needed). cos/sin: the rotary tables of the
    frame's G positions (G, head_dim), computed once with the workspace (a step slices them: no rotary ops and
    no repeat per step); None computes them per step. slots: (G, B) int64, ``b·G + p`` — the workspace seen as
    B pages of G rows, so a step's K/V rows are written by the q/k kernel itself (None: copied per step)."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    def step_slots(self, start: int, t: int) -> torch.Tensor | None:
        """(B·t,) slots of positions start..start+t-1, rows batch-major (a view for one position)."""
        if self.slots is None:
            return None
        if t == 1:
            return self.slots[start]
        return self.slots[start:start + t].t().reshape(-1)

    @property
    def batch(self) -> int:
        return self.k.shape[1]


@dataclasses.dataclass
class FrameSampling:
    """Per-row sampling of the residual codes. temperature: (B,) fp32, 0 = greedy; top_k (B,) int64; top_p (B,)
    fp32; seeds (B,) int64; frame_index (B,) int64 — the draw for code j of a frame uses counter step
    ``frame_index·G + j``, so results do not depend on batch composition."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    frame_index: torch.Tensor

    @classmethod
    def for_talker(cls, talker_temperatures, talker_seeds, frame_index, device=None) -> "FrameSampling | None":
        """The code predictor's sampling for rows whose talker samples with ``talker_temperatures`` (host
        lists; seeds and frame indices per row), or None when every row is greedy (the argmax path)."""
        rows = cls.host_rows(talker_temperatures, talker_seeds, frame_index)
        if rows is None:
            return None
        f32, i64 = torch.float32, torch.int64
        return cls(**{k: torch.tensor(v, dtype=f32 if k in ("temperature", "top_p") else i64, device=device)
                      for k, v in rows.items()})

    @staticmethod
    def host_rows(talker_temperatures, talker_seeds, frame_index) -> dict[str, list] | None:
        """:meth:`for_talker` as host lists by field name (a graph runner stages them), or None if all greedy."""
        if all(t == 0 for t in talker_temperatures):
            return None
        n = len(talker_temperatures)
        return {"temperature": [CP_TEMPERATURE if t > 0 else 0.0 for t in talker_temperatures],
                "top_k": [CP_TOP_K] * n, "top_p": [CP_TOP_P] * n,
                "seeds": [(s ^ CP_SEED_SALT) & ((1 << 63) - 1) for s in talker_seeds],
                "frame_index": list(frame_index)}


class CodePredictorAttention(nn.Module):
    """GQA attention with q/k RMSNorm and 1-D RoPE over the contiguous frame workspace."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        h = cfg.hidden_size
        # q, k and v in one GEMM (the checkpoint's q_proj/k_proj/v_proj, concatenated at load)
        self.qkv_proj = make_linear(h, (self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                        self.kv_heads * self.head_dim))
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        fuse_parts_on_load(self)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, start: int, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, hidden) at positions start..start+T-1; k/v_cache: (B, kv_heads, S, head_dim) written in
        place at those positions; cos/sin: (T, head_dim); slots: (B·T,) ``b·S + position`` (the K/V write then
        happens inside the q/k kernel) or None → (B, T, hidden)."""
        b, t, _ = x.shape
        q, k, v = split(self.qkv_proj(x).view(b * t, -1), self.qkv_proj.parts)
        q = q.view(b * t, self.heads, self.head_dim)
        k = k.view(b * t, self.kv_heads, self.head_dim)
        v = v.view(b * t, self.kv_heads, self.head_dim)
        # q/k norms, rotary (the (t, head_dim) tables serve all b rows) and the workspace write — the workspace
        # seen as b pages of S rows — in one kernel on the Triton path
        pages = (k_cache.transpose(1, 2), v_cache.transpose(1, 2)) if slots is not None else None
        q, k = qk_norm_rope(q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, pages,
                            slots)
        if slots is None:
            k_cache[:, :, start:start + t] = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v_cache[:, :, start:start + t] = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        end = start + t
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]            # (B, kvh, end, hd)
        groups = self.heads // self.kv_heads
        q = q.view(b, t, self.kv_heads, groups, self.head_dim).permute(0, 2, 3, 1, 4)  # (B, kvh, g, T, hd)
        scores = torch.matmul(q, keys[:, :, None].transpose(-1, -2)) * self.scale  # (B, kvh, g, T, end)
        if t > 1:
            qpos = torch.arange(start, end, device=x.device)[:, None]
            kpos = torch.arange(end, device=x.device)[None, :]
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values[:, :, None])                        # (B, kvh, g, T, hd)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, self.heads * self.head_dim)
        return self.o_proj(out)


class CodePredictorLayer(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = CodePredictorAttention(cfg)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, residual, cos, sin, k_cache, v_cache, start: int, slots=None):
        """As the thinker's DecoderLayer: returns (mlp output, residual); the stream is their sum."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, k_cache, v_cache, start, slots)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CodePredictorModel(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.layers = nn.ModuleList(CodePredictorLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.hidden_size)
                                             for _ in range(cfg.num_code_groups - 1))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, ws: FrameWorkspace, start: int) -> torch.Tensor:
        """x: (B, T, hidden) at positions start.. → normed hidden (B, T, hidden); fills the workspace."""
        t = x.shape[1]
        if ws.cos is not None:
            cos, sin = ws.cos[start:start + t], ws.sin[start:start + t]
        else:
            cos, sin = self.rotary(torch.arange(start, start + t, device=x.device), x.dtype)
        residual = None
        slots = ws.step_slots(start, t)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, ws.k[i], ws.v[i], start, slots)
        return self.norm(x, residual)[0]


def _pick(logits: torch.Tensor, sampling: FrameSampling | None, j: int, groups: int) -> torch.Tensor:
    """logits (B, vocab) → code j (B,) int64: argmax, or the sampler's per-row draw (no host sync)."""
    if sampling is None:
        return logits.argmax(dim=-1)
    st = SamplingTensors(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                         repetition_penalty=torch.ones_like(sampling.temperature), seeds=sampling.seeds,
                         steps=sampling.frame_index * groups + j)
    return sample(logits, st)


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                                     for _ in range(cfg.num_code_groups - 1))

    def workspace(self, batch: int, device=None, dtype: torch.dtype | None = None) -> FrameWorkspace:
        """A frame KV workspace for ``batch`` rows (G positions: the input pair + G-2 fed codes)."""
        w = self.lm_head[0].weight
        c = self.cfg
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, c.num_code_groups, c.head_dim)
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        g = c.num_code_groups
        cos, sin = self.model.rotary(torch.arange(g, device=device), dtype)
        slots = torch.arange(g, device=device)[:, None] + torch.arange(batch, device=device)[None, :] * g
        return FrameWorkspace(torch.empty(shape, device=device, dtype=dtype),
                              torch.empty(shape, device=device, dtype=dtype), cos, sin, slots)

    def frame(self, past_hidden: torch.Tensor, code0_embed: torch.Tensor, ws: FrameWorkspace | None = None,
              sampling: FrameSampling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's residual codes for B rows.

        past_hidden: (B, H) talker post-norm hidden of the position that produced code0;
        code0_embed: (B, H) talker ``codec_embedding(code0)``. Returns (codes (B, G-1) int64 = codes 1..G-1,
        next talker codec input (B, H) = sum of the G code embeddings, code0's included).
        """
        groups = self.cfg.num_code_groups
        b = past_hidden.shape[0]
        if ws is None or ws.batch != b:
            ws = self.workspace(b, past_hidden.device, past_hidden.dtype)
        h = self.model(torch.stack((past_hidden, code0_embed), dim=1), ws, 0)
        code = _pick(self.lm_head[0](h[:, -1]), sampling, 1, groups)
        codes, embeds = [code], [code0_embed]
        for j in range(1, groups - 1):
            e = self.model.codec_embedding[j - 1](code)
            embeds.append(e)
            h = self.model(e[:, None], ws, j + 1)
            code = _pick(self.lm_head[j](h[:, 0]), sampling, j + 1, groups)
            codes.append(code)
        embeds.append(self.model.codec_embedding[groups - 2](code))
        # one reduction over the stacked embeddings, as the reference's cat(...).sum(1)
        return torch.stack(codes, dim=1), torch.stack(embeds, dim=1).sum(1)

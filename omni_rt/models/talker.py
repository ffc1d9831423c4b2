"""The Talker: a Qwen3 MoE decoder (every layer MoE + sigmoid-gated shared expert, interleaved M-RoPE) that
reads projected thinker states and emits codec code 0 of each frame; the code predictor adds codes 1..G-1.

Reference: transformers ``Qwen3OmniMoeTalkerForConditionalGeneration`` / ``Qwen3OmniMoeTalkerModel``.
Parameter names (under ``talker.``): ``model.layers.N.*``, ``model.norm``, ``model.codec_embedding``,
``codec_head``, ``{text,hidden}_projection.linear_fc{1,2}``, ``code_predictor.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TalkerConfig
from .code_predictor import CodePredictor
from .layers import AttentionMetadata
from .thinker import Decoder


class ResizeMLP(nn.Module):
    """Linear → SiLU → Linear with biases: thinker width → talker width (reference TalkerResizeMLP)."""

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_dim, mid_dim, bias=True)
        self.linear_fc2 = nn.Linear(mid_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., thinker_hidden) → (..., talker_hidden)."""
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerDecoder(Decoder):
    """The thinker's Decoder with shared experts and no token embedding, plus the codec embedding table."""

    def __init__(self, cfg, fp8: bool = False):
        super().__init__(cfg, shared_expert=True, embed=False, fp8=fp8)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig, thinker_hidden: int, fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.text
        self.model = TalkerDecoder(d, fp8)
        self.codec_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        # the reference sizes fc1 by text_config.intermediate_size (equal to the thinker width when released)
        self.text_projection = ResizeMLP(thinker_hidden, d.intermediate_size, d.hidden_size)
        self.hidden_projection = ResizeMLP(thinker_hidden, d.intermediate_size, d.hidden_size)
        self.code_predictor = CodePredictor(cfg.code_predictor)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                tap_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embeds: (tokens, H); positions: (3, tokens) → (post-norm hidden (tokens, H), tap or None)."""
        return self.model(embeds, positions, kv_caches, meta, tap_layer)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (n, H) post-norm → codec logits (n, vocab)."""
        return self.codec_head(hidden)

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) codec ids → (..., H) talker codec embeddings."""
        return self.model.codec_embedding(ids)

    def suppress_mask(self, device) -> torch.Tensor:
        """(vocab,) bool: the reference's suppressed codec ids, [vocab-1024, vocab) except codec_eos."""
        v = self.cfg.text.vocab_size
        mask = torch.zeros(v, dtype=torch.bool, device=device)
        mask[max(v - 1024, 0):] = True
        mask[self.cfg.codec_eos_token_id] = False
        return mask

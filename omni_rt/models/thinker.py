"""The Thinker: token embeddings with audio features scattered into <|audio_pad|> positions, a Qwen3 MoE
decoder (q/k-norm GQA attention with interleaved M-RoPE over a paged KV cache), final norm and lm_head.

Parameter names (under ``thinker.``): ``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``,
``audio_tower.*`` — the on-disk names, experts stacked. The talker's taps are exposed: the input embeddings
(after the audio scatter) and the hidden state after ``accept_hidden_layer`` layers (before the final norm).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DecoderConfig, ThinkerConfig
from .audio_encoder import AudioEncoder
from .layers import Attention, AttentionMetadata, DenseMLP, RMSNorm, Rotary
from .moe import SparseMoE
from .vision_encoder import VisionEncoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, shared_expert: bool, fp8: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim, cfg.rms_norm_eps, fp8)
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                 cfg.moe_intermediate_size, cfg.norm_topk_prob,
                                 cfg.shared_expert_intermediate_size if shared_expert else 0, fp8)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, fp8)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after this layer is ``out + residual_out`` (the add is fused into the next norm).

        x: (tokens, hidden) — the stream itself when ``residual`` is None, else the previous layer's MLP output
        whose stream is ``x + residual``. Returns (mlp output, residual before its add)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Decoder(nn.Module):
    """Layers + final norm over packed tokens (no batch dim: sequences are delimited by the metadata)."""

    def __init__(self, cfg: DecoderConfig, shared_expert: bool = False, embed: bool = True, fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        if embed:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, shared_expert, fp8) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, tap_layer: int | None = None,
                deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (tokens, hidden); positions: (3, tokens) float or int → (normed hidden (tokens, hidden), tapped
        hidden or None).

        ``tap_layer`` k returns the residual stream after k layers (transformers' ``hidden_states[k]``).
        ``deepstack`` (visual mask (tokens,) bool, [features (mask.sum(), hidden)] per tap): feature j is added
        at the visual tokens after layer j (prefill only; the reference's _deepstack_process).
        """
        cos, sin = self.rotary(positions, x.dtype)
        tap = x if tap_layer == 0 else None
        residual = None   # the stream is x + residual; each add is fused into the next norm
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, kv_caches[i], meta)
            ds = deepstack is not None and i < len(deepstack[1])
            if ds or tap_layer == i + 1:
                x, residual = x + residual, None   # the stream itself is needed here
                # transformers records hidden_states[k] at the layer's output, before the deepstack addition.
                if tap_layer == i + 1:
                    tap = x
                if ds:
                    x = x.index_put((deepstack[0],), deepstack[1][i].to(x.dtype), accumulate=True)
        return (self.norm(x) if residual is None else self.norm(x, residual)[0]), tap


class Thinker(nn.Module):
    """``fp8``: the decoder layers' projections hold block-FP8 weights (see models.layers.FP8Linear)."""

    def __init__(self, cfg: ThinkerConfig, fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg.text, fp8=fp8)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.audio_tower = AudioEncoder(cfg.audio)
        # None for checkpoints without a vision tower (e.g. the Captioner): vision inputs are refused.
        self.visual = VisionEncoder(cfg.vision) if cfg.vision is not None else None

    def embed(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None, video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (tokens,) → (tokens, hidden), audio / image / video features replacing the
        <|audio_pad|> / <|image_pad|> / <|video_pad|> embeddings in order.

        Each *_embeds: (n_pad_tokens of that kind, hidden); its length must equal that pad count.
        """
        x = self.model.embed_tokens(input_ids)
        for feats, token in ((audio_embeds, self.cfg.audio_token_id), (image_embeds, self.cfg.image_token_id),
                             (video_embeds, self.cfg.video_token_id)):
            if feats is not None and feats.shape[0] > 0:
                mask = input_ids == token
                x = x.masked_scatter(mask[:, None], feats.to(x.dtype))
        return x

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                tap_layer: int | None = None, deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(embeds, positions, kv_caches, meta, tap_layer, deepstack)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (n, hidden) normed → (n, vocab) in the model dtype."""
        return self.lm_head(hidden)

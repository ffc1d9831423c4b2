"""The on-disk tensor layout of a Qwen3-Omni checkpoint (HF safetensors names and shapes).

``checkpoint_layout(cfg)`` lists every tensor a checkpoint of that config holds, in the names transformers'
``save_pretrained`` writes (experts one by one, vision tower included). It is the one place these names live:
``testing.make_checkpoint`` writes exactly this and ``loader`` checks files against it.
"""
from __future__ import annotations

import re
from typing import Any

from .config import OmniConfig
from .quant import BLOCK, SCALE_SUFFIX, is_fp8_eligible, module_name, scale_name, scale_shape

Shape = tuple[int, ...]


def _decoder_layers(out: dict, prefix: str, d, *, shared: bool) -> None:
    h, hd = d.hidden_size, d.head_dim
    for i in range(d.num_hidden_layers):
        p = f"{prefix}.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        out[f"{p}.self_attn.q_proj.weight"] = (d.num_attention_heads * hd, h)
        out[f"{p}.self_attn.k_proj.weight"] = (d.num_key_value_heads * hd, h)
        out[f"{p}.self_attn.v_proj.weight"] = (d.num_key_value_heads * hd, h)
        out[f"{p}.self_attn.o_proj.weight"] = (h, d.num_attention_heads * hd)
        out[f"{p}.self_attn.q_norm.weight"] = (hd,)
        out[f"{p}.self_attn.k_norm.weight"] = (hd,)
        if d.is_moe_layer(i):
            out[f"{p}.mlp.gate.weight"] = (d.num_experts, h)
            for e in range(d.num_experts):
                out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (d.moe_intermediate_size, h)
                out[f"{p}.mlp.experts.{e}.up_proj.weight"] = (d.moe_intermediate_size, h)
                out[f"{p}.mlp.experts.{e}.down_proj.weight"] = (h, d.moe_intermediate_size)
            if shared and d.shared_expert_intermediate_size > 0:
                si = d.shared_expert_intermediate_size
                out[f"{p}.mlp.shared_expert.gate_proj.weight"] = (si, h)
                out[f"{p}.mlp.shared_expert.up_proj.weight"] = (si, h)
                out[f"{p}.mlp.shared_expert.down_proj.weight"] = (h, si)
                out[f"{p}.mlp.shared_expert_gate.weight"] = (1, h)
        else:
            out[f"{p}.mlp.gate_proj.weight"] = (d.intermediate_size, h)
            out[f"{p}.mlp.up_proj.weight"] = (d.intermediate_size, h)
            out[f"{p}.mlp.down_proj.weight"] = (h, d.intermediate_size)
    out[f"{prefix}.norm.weight"] = (h,)


def _audio_tower(out: dict, a) -> None:
    p = "thinker.audio_tower"
    c = a.downsample_hidden_size
    out[f"{p}.conv2d1.weight"] = (c, 1, 3, 3)
    out[f"{p}.conv2d1.bias"] = (c,)
    for n in (2, 3):
        out[f"{p}.conv2d{n}.weight"] = (c, c, 3, 3)
        out[f"{p}.conv2d{n}.bias"] = (c,)
    freq = a.num_mel_bins
    for _ in range(3):
        freq = (freq - 1) // 2 + 1  # conv 3x3, stride 2, padding 1
    out[f"{p}.conv_out.weight"] = (a.d_model, c * freq)
    d, f = a.d_model, a.encoder_ffn_dim
    for i in range(a.encoder_layers):
        q = f"{p}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{q}.self_attn.{proj}.weight"] = (d, d)
            out[f"{q}.self_attn.{proj}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            out[f"{q}.{norm}.weight"] = (d,)
            out[f"{q}.{norm}.bias"] = (d,)
        out[f"{q}.fc1.weight"] = (f, d)
        out[f"{q}.fc1.bias"] = (f,)
        out[f"{q}.fc2.weight"] = (d, f)
        out[f"{q}.fc2.bias"] = (d,)
    out[f"{p}.ln_post.weight"] = (d,)
    out[f"{p}.ln_post.bias"] = (d,)
    out[f"{p}.proj1.weight"] = (d, d)
    out[f"{p}.proj1.bias"] = (d,)
    out[f"{p}.proj2.weight"] = (a.output_dim, d)
    out[f"{p}.proj2.bias"] = (a.output_dim,)


def _vision_tower(out: dict, v) -> None:
    p = "thinker.visual"
    h, inter = v.hidden_size, v.intermediate_size
    out[f"{p}.patch_embed.proj.weight"] = (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out[f"{p}.patch_embed.proj.bias"] = (h,)
    out[f"{p}.pos_embed.weight"] = (v.num_position_embeddings, h)
    for i in range(v.depth):
        q = f"{p}.blocks.{i}"
        out[f"{q}.attn.qkv.weight"] = (3 * h, h)
        out[f"{q}.attn.qkv.bias"] = (3 * h,)
        out[f"{q}.attn.proj.weight"] = (h, h)
        out[f"{q}.attn.proj.bias"] = (h,)
        out[f"{q}.mlp.linear_fc1.weight"] = (inter, h)
        out[f"{q}.mlp.linear_fc1.bias"] = (inter,)
        out[f"{q}.mlp.linear_fc2.weight"] = (h, inter)
        out[f"{q}.mlp.linear_fc2.bias"] = (h,)
        for norm in ("norm1", "norm2"):
            out[f"{q}.{norm}.weight"] = (h,)
            out[f"{q}.{norm}.bias"] = (h,)
    merged = v.merged_size
    # The final merger normalises before the 2x2 shuffle (width h); the deepstack mergers after it (4h).
    mergers = [("merger", h)] + [(f"merger_list.{j}", merged) for j in range(len(v.deepstack_visual_indexes))]
    for name, norm_dim in mergers:
        out[f"{p}.{name}.ln_q.weight"] = (norm_dim,)
        out[f"{p}.{name}.ln_q.bias"] = (norm_dim,)
        out[f"{p}.{name}.mlp.0.weight"] = (merged, merged)
        out[f"{p}.{name}.mlp.0.bias"] = (merged,)
        out[f"{p}.{name}.mlp.2.weight"] = (v.out_hidden_size, merged)
        out[f"{p}.{name}.mlp.2.bias"] = (v.out_hidden_size,)


def _talker(out: dict, t, thinker_hidden: int) -> None:
    d = t.text
    _decoder_layers(out, "talker.model", d, shared=True)
    out["talker.model.codec_embedding.weight"] = (d.vocab_size, d.hidden_size)
    out["talker.codec_head.weight"] = (d.vocab_size, d.hidden_size)
    for proj in ("text_projection", "hidden_projection"):  # thinker width -> intermediate -> talker width
        out[f"talker.{proj}.linear_fc1.weight"] = (d.intermediate_size, thinker_hidden)
        out[f"talker.{proj}.linear_fc1.bias"] = (d.intermediate_size,)
        out[f"talker.{proj}.linear_fc2.weight"] = (d.hidden_size, d.intermediate_size)
        out[f"talker.{proj}.linear_fc2.bias"] = (d.hidden_size,)
    cp = t.code_predictor
    p = "talker.code_predictor"
    h, hd = cp.hidden_size, cp.head_dim
    for i in range(cp.num_hidden_layers):
        q = f"{p}.model.layers.{i}"
        out[f"{q}.input_layernorm.weight"] = (h,)
        out[f"{q}.post_attention_layernorm.weight"] = (h,)
        out[f"{q}.self_attn.q_proj.weight"] = (cp.num_attention_heads * hd, h)
        out[f"{q}.self_attn.k_proj.weight"] = (cp.num_key_value_heads * hd, h)
        out[f"{q}.self_attn.v_proj.weight"] = (cp.num_key_value_heads * hd, h)
        out[f"{q}.self_attn.o_proj.weight"] = (h, cp.num_attention_heads * hd)
        out[f"{q}.self_attn.q_norm.weight"] = (hd,)
        out[f"{q}.self_attn.k_norm.weight"] = (hd,)
        out[f"{q}.mlp.gate_proj.weight"] = (cp.intermediate_size, h)
        out[f"{q}.mlp.up_proj.weight"] = (cp.intermediate_size, h)
        out[f"{q}.mlp.down_proj.weight"] = (h, cp.intermediate_size)
    out[f"{p}.model.norm.weight"] = (h,)
    for g in range(t.num_code_groups - 1):
        out[f"{p}.model.codec_embedding.{g}.weight"] = (cp.vocab_size, h)
        out[f"{p}.lm_head.{g}.weight"] = (cp.vocab_size, h)


def _code2wav(out: dict, c) -> None:
    p = "code2wav"
    h = c.hidden_size
    out[f"{p}.code_embedding.weight"] = (c.num_quantizers * c.codebook_size, h)
    for i in range(c.num_hidden_layers):
        q = f"{p}.pre_transformer.layers.{i}"
        out[f"{q}.input_layernorm.weight"] = (h,)
        out[f"{q}.post_attention_layernorm.weight"] = (h,)
        out[f"{q}.self_attn.q_proj.weight"] = (c.num_attention_heads * c.head_dim, h)
        out[f"{q}.self_attn.k_proj.weight"] = (c.num_key_value_heads * c.head_dim, h)
        out[f"{q}.self_attn.v_proj.weight"] = (c.num_key_value_heads * c.head_dim, h)
        out[f"{q}.self_attn.o_proj.weight"] = (h, c.num_attention_heads * c.head_dim)
        out[f"{q}.self_attn_layer_scale.scale"] = (h,)
        out[f"{q}.mlp_layer_scale.scale"] = (h,)
        out[f"{q}.mlp.gate_proj.weight"] = (c.intermediate_size, h)
        out[f"{q}.mlp.up_proj.weight"] = (c.intermediate_size, h)
        out[f"{q}.mlp.down_proj.weight"] = (h, c.intermediate_size)
    out[f"{p}.pre_transformer.norm.weight"] = (h,)
    for i, r in enumerate(c.upsampling_ratios):
        q = f"{p}.upsample.{i}"
        out[f"{q}.0.conv.weight"] = (h, h, r)          # ConvTranspose1d: (in, out, k)
        out[f"{q}.0.conv.bias"] = (h,)
        out[f"{q}.1.dwconv.conv.weight"] = (h, 1, 7)
        out[f"{q}.1.dwconv.conv.bias"] = (h,)
        out[f"{q}.1.norm.weight"] = (h,)
        out[f"{q}.1.norm.bias"] = (h,)
        out[f"{q}.1.pwconv1.weight"] = (4 * h, h)
        out[f"{q}.1.pwconv1.bias"] = (4 * h,)
        out[f"{q}.1.pwconv2.weight"] = (h, 4 * h)
        out[f"{q}.1.pwconv2.bias"] = (h,)
        out[f"{q}.1.gamma"] = (h,)
    dim = c.decoder_dim
    out[f"{p}.decoder.0.conv.weight"] = (dim, h, 7)
    out[f"{p}.decoder.0.conv.bias"] = (dim,)
    for b, rate in enumerate(c.upsample_rates, start=1):
        q = f"{p}.decoder.{b}.block"
        cin, cout = dim // 2 ** (b - 1), dim // 2 ** b
        out[f"{q}.0.alpha"] = (cin,)
        out[f"{q}.0.beta"] = (cin,)
        out[f"{q}.1.conv.weight"] = (cin, cout, 2 * rate)
        out[f"{q}.1.conv.bias"] = (cout,)
        for u in range(2, 5):
            for act in ("act1", "act2"):
                out[f"{q}.{u}.{act}.alpha"] = (cout,)
                out[f"{q}.{u}.{act}.beta"] = (cout,)
            out[f"{q}.{u}.conv1.conv.weight"] = (cout, cout, 7)
            out[f"{q}.{u}.conv1.conv.bias"] = (cout,)
            out[f"{q}.{u}.conv2.conv.weight"] = (cout, cout, 1)
            out[f"{q}.{u}.conv2.conv.bias"] = (cout,)
    last = len(c.upsample_rates) + 1
    final = dim // 2 ** len(c.upsample_rates)
    out[f"{p}.decoder.{last}.alpha"] = (final,)
    out[f"{p}.decoder.{last}.beta"] = (final,)
    out[f"{p}.decoder.{last + 1}.conv.weight"] = (1, final, 7)
    out[f"{p}.decoder.{last + 1}.conv.bias"] = (1,)


def checkpoint_layout(cfg: OmniConfig) -> dict[str, Shape]:
    """Every tensor name -> shape a checkpoint of ``cfg`` holds on disk (HF names, experts unstacked).

    With ``cfg.quantization`` (block FP8) it also lists the ``*.weight_scale_inv`` of every FP8-eligible
    weight not in ``modules_to_not_convert`` (``fp8_scale_layout``).
    """
    out = _weights_layout(cfg)
    if cfg.quantization is not None:
        out.update(fp8_scale_layout(cfg, out))
    return out


def fp8_scale_layout(cfg: OmniConfig, weights: dict[str, Shape] | None = None) -> dict[str, Shape]:
    """Scale tensor name -> grid shape for the weights a block-FP8 checkpoint of ``cfg`` stores in FP8."""
    q = cfg.quantization
    block = q.weight_block_size if q is not None else BLOCK
    weights = weights if weights is not None else _weights_layout(cfg)
    return {scale_name(n): scale_shape(s, block) for n, s in weights.items()
            if is_fp8_eligible(n) and not (q is not None and q.keeps(module_name(n)))}


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def _weights_layout(cfg: OmniConfig) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    th = cfg.thinker
    out["thinker.model.embed_tokens.weight"] = (th.text.vocab_size, th.text.hidden_size)
    _decoder_layers(out, "thinker.model", th.text, shared=False)
    out["thinker.lm_head.weight"] = (th.text.vocab_size, th.text.hidden_size)
    _audio_tower(out, th.audio)
    if th.vision is not None:
        _vision_tower(out, th.vision)
    if cfg.has_talker:
        _talker(out, cfg.talker, th.text.hidden_size)
        _code2wav(out, cfg.code2wav)
    return out


# Projections that read the same input and that omni_rt computes with ONE GEMM: their on-disk matrices (and
# biases, and FP8 scale grids) are concatenated along the output rows at load time, in part order, into one
# parameter of the owning module. On disk (and in ``checkpoint_layout``/``model_layout``, which are
# transformers' names) they stay separate; only the in-memory module holds the fused parameter.
# (owner module name, fused leaf module, parts in row order)
_FUSIONS = (
    (re.compile(r"^(?P<owner>(?:.+\.)?self_attn)\.(?P<part>q|k|v)_proj\.(?P<leaf>weight|bias|weight_scale_inv)$"),
     "qkv_proj", ("q", "k", "v")),
    (re.compile(r"^(?P<owner>(?:.+\.)?(?:mlp|shared_expert))\.(?P<part>gate|up)_proj\.(?P<leaf>weight|weight_scale_inv)$"),
     "gate_up_proj", ("gate", "up")),
)


def fused_target(name: str) -> tuple[str, int, int] | None:
    """Where an on-disk part goes: ``x.self_attn.k_proj.weight`` -> ("x.self_attn.qkv_proj.weight", 1, 3)
    (fused name, part index, part count); ``x.mlp.up_proj.weight_scale_inv`` -> ("x.mlp.gate_up_proj
    .weight_scale_inv", 1, 2); None for a tensor that is not fused (experts, routers, o_proj, norms, ...)."""
    for pattern, fused, parts in _FUSIONS:
        m = pattern.match(name)
        if m:
            return f"{m['owner']}.{fused}.{m['leaf']}", parts.index(m["part"]), len(parts)
    return None


def fused_parts(target: str) -> tuple[str, ...] | None:
    """The on-disk names a fused parameter is built from, in row order (inverse of ``fused_target``)."""
    for _, fused, parts in _FUSIONS:
        owner, sep, rest = target.rpartition(f".{fused}.")
        if sep and "." not in rest:
            return tuple(f"{owner}.{p}_proj.{rest}" for p in parts)
    return None


def fused_layout(layout: dict[str, Shape]) -> dict[str, Shape]:
    """A name -> shape layout (on-disk or ``model_layout``) with fused parts replaced by their fused parameter
    (rows summed): the parameters of omni_rt's modules. Scale grids are each part's grid stacked."""
    out: dict[str, Shape] = {}
    for name, shape in layout.items():
        fused = fused_target(name)
        if fused is None:
            out[name] = shape
            continue
        target = fused[0]
        prev = out.get(target)
        out[target] = shape if prev is None else (prev[0] + shape[0], *shape[1:])
    return out


_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """``x.mlp.experts.7.up_proj.weight`` -> ("x.mlp.experts", 7, "up_proj"); None for other names."""
    m = _EXPERT.match(name)
    return (m["prefix"], int(m["e"]), m["proj"]) if m else None


def model_layout(cfg: OmniConfig, fp8: bool = False) -> dict[str, Shape]:
    """Every parameter name -> shape of omni_rt's in-memory model.

    Names equal the on-disk ones, except that per-expert weights are stacked as transformers does in memory:
    ``...mlp.experts.gate_up_proj`` (E, 2I, H) with the gate half first, and ``...mlp.experts.down_proj``
    (E, H, I). With ``fp8`` (weights kept in FP8 on the device)
    every FP8-eligible weight has a ``*_scale_inv`` grid next to it; the stacked ``gate_up_proj_scale_inv`` is
    (E, 2·ceil(I/128), ceil(H/128)): the gate part's grid, then the up part's.
    """
    out: dict[str, Shape] = {}
    experts: dict[str, list] = {}
    for name, shape in _weights_layout(cfg).items():
        if fp8 and is_fp8_eligible(name) and parse_expert_name(name) is None:
            out[scale_name(name)] = scale_shape(shape)
        parsed = parse_expert_name(name)
        if parsed is None:
            out[name] = shape
            continue
        prefix, e, proj = parsed
        info = experts.setdefault(prefix, [0, None, None])
        info[0] = max(info[0], e + 1)
        if proj == "down_proj":
            info[2] = shape
        else:
            info[1] = shape
    for prefix, (n, gate_shape, down_shape) in experts.items():
        out[f"{prefix}.gate_up_proj"] = (n, 2 * gate_shape[0], gate_shape[1])
        out[f"{prefix}.down_proj"] = (n, *down_shape)
        if fp8:
            g_rows, g_cols = scale_shape(gate_shape)
            out[scale_name(f"{prefix}.gate_up_proj")] = (n, 2 * g_rows, g_cols)
            out[scale_name(f"{prefix}.down_proj")] = (n, *scale_shape(down_shape))
    return out

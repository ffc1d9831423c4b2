"""Named synthetic configs in the exact config.json layout of the released checkpoint.

- ``tiny``: ~1 M params, every structural feature kept (experts with top-k > 1, GQA with q wider than
  hidden, M-RoPE sections, several audio attention windows, 4 code groups, the real Code2Wav upsampling
  structure with small channels). Token ids are remapped into a 512 vocab: special = 448 + (real - 151643).
- ``small``: a few tens of M params, for CPU benchmarks.
- ``full-1layer``: the released widths with one layer per stack (layout/shape tests, loader benchmark).
- ``full``: the released config itself.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

_RELEASED = "qwen3-omni-30b-a3b-instruct.json"


def _special(real: int) -> int:
    return 448 + (real - 151643)


def released_config() -> dict[str, Any]:
    """The released checkpoint's config.json (shipped with the package as an asset)."""
    here = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", _RELEASED)
    with open(here, encoding="utf-8") as f:
        return json.load(f)


def _rope(theta: float, section: list[int] | None) -> dict[str, Any]:
    if section is None:
        return {"rope_theta": theta, "rope_type": "default"}
    return {"interleaved": True, "mrope_interleaved": True, "mrope_section": section, "rope_theta": theta,
            "rope_type": "default", "type": "default"}


def _scaled(hidden: int, heads: int, kv: int, head_dim: int, layers: int, experts: int, topk: int,
            moe_i: int, shared_i: int, audio_d: int, audio_heads: int, audio_layers: int, audio_ffn: int,
            down_hidden: int, n_window_infer: int, talker_hidden: int, talker_heads: int, talker_kv: int,
            talker_layers: int, talker_experts: int, talker_topk: int, talker_moe_i: int, cp_hidden: int,
            cp_layers: int, cp_heads: int, cp_kv: int, cp_head_dim: int, groups: int, codebook: int,
            c2w_hidden: int, c2w_layers: int, c2w_heads: int, decoder_dim: int, sliding_window: int,
            accept_layer: int, section: list[int]) -> dict[str, Any]:
    """A config with small sizes and the released structure, with token ids remapped into a 512 vocab."""
    cfg = released_config()
    vocab = 512
    ids = {k: _special(v) for k, v in {
        "im_start_token_id": 151644, "im_end_token_id": 151645, "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672, "tts_eos_token_id": 151673}.items()}
    cfg.update(ids)
    cfg.update({"system_token_id": 10, "user_token_id": 11, "assistant_token_id": 12})
    audio_ids = {"audio_start_token_id": _special(151669), "audio_end_token_id": _special(151670),
                 "audio_token_id": _special(151675), "image_token_id": _special(151655),
                 "video_token_id": _special(151656), "vision_start_token_id": _special(151652)}

    th = cfg["thinker_config"]
    th.update(audio_ids)
    th["user_token_id"] = 11
    th["vision_end_token_id"] = _special(151653)
    th["audio_config"].update({
        "d_model": audio_d, "encoder_attention_heads": audio_heads, "encoder_layers": audio_layers,
        "encoder_ffn_dim": audio_ffn, "downsample_hidden_size": down_hidden, "output_dim": hidden,
        "n_window": 50, "n_window_infer": n_window_infer})
    # A tiny ViT with the released patch geometry (patch 16, temporal 2, merge 2), so preprocessing is the
    # released one; an 8x8 learned position grid (interpolated to every image's grid) and two deepstack taps,
    # added after thinker layers 0 and 1.
    th["vision_config"].update({
        "depth": 3, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
        "deepstack_visual_indexes": [0, 2], "num_position_embeddings": 64, "patch_size": 16,
        "spatial_patch_size": 16, "image_size": 128})
    th["text_config"].update({
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "num_hidden_layers": layers, "num_experts": experts, "num_experts_per_tok": topk,
        "moe_intermediate_size": moe_i, "intermediate_size": moe_i,
        "rope_parameters": _rope(1e6, section), "max_position_embeddings": 65536})

    tk = cfg["talker_config"]
    tk.update(audio_ids)
    tk.pop("audio_end_token_id", None)
    # Codec ids keep their offsets above the codebook: [codebook, codebook + 1024) is the suppressed band.
    codec = {k: codebook + (v - 2048) for k, v in {
        "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150, "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156, "codec_think_eos_id": 2157}.items()}
    tk.update(codec)
    tk["speaker_id"] = {name: codebook + (v - 2048) for name, v in tk["speaker_id"].items()}
    tk.update({"num_code_groups": groups, "thinker_hidden_size": hidden, "accept_hidden_layer": accept_layer})
    tk["text_config"].update({
        "vocab_size": codebook + 1024, "hidden_size": talker_hidden, "num_attention_heads": talker_heads,
        "num_key_value_heads": talker_kv, "head_dim": head_dim, "num_hidden_layers": talker_layers,
        "num_local_experts": talker_experts, "num_experts_per_tok": talker_topk,
        "moe_intermediate_size": talker_moe_i, "shared_expert_intermediate_size": shared_i,
        "intermediate_size": 2 * shared_i, "rope_parameters": _rope(1e6, section)})
    tk["code_predictor_config"].update({
        "vocab_size": codebook, "hidden_size": cp_hidden, "intermediate_size": 3 * cp_hidden,
        "num_hidden_layers": cp_layers, "num_attention_heads": cp_heads, "num_key_value_heads": cp_kv,
        "head_dim": cp_head_dim, "num_code_groups": groups, "layer_types": ["full_attention"] * cp_layers})

    cfg["code2wav_config"].update({
        "codebook_size": codebook, "hidden_size": c2w_hidden, "intermediate_size": 3 * c2w_hidden,
        "num_hidden_layers": c2w_layers, "num_attention_heads": c2w_heads, "num_key_value_heads": c2w_heads,
        "num_quantizers": groups, "decoder_dim": decoder_dim, "sliding_window": sliding_window})
    return cfg


def tiny_config() -> dict[str, Any]:
    """~1 M params; n_window_infer 200 gives 26-token audio windows (several per few seconds of audio)."""
    return _scaled(hidden=48, heads=4, kv=2, head_dim=16, layers=3, experts=8, topk=3, moe_i=32, shared_i=24,
                   audio_d=32, audio_heads=4, audio_layers=2, audio_ffn=64, down_hidden=8, n_window_infer=200,
                   talker_hidden=32, talker_heads=4, talker_kv=2, talker_layers=2, talker_experts=6,
                   talker_topk=2, talker_moe_i=16, cp_hidden=32, cp_layers=2, cp_heads=4, cp_kv=2,
                   cp_head_dim=8, groups=4, codebook=64, c2w_hidden=32, c2w_layers=2, c2w_heads=4,
                   decoder_dim=64, sliding_window=8, accept_layer=2, section=[4, 2, 2])


def tiny_wide_config() -> dict[str, Any]:
    """The tiny structure with decoder widths that span several 128-blocks and are not multiples of 128
    (hidden 136, q 160, k/v 80, expert/dense/shared intermediate 136), and a dense first thinker layer: every
    block-FP8 scale grid then has partial edge blocks, and fused gate/up parts do not line up on 128 rows."""
    cfg = _scaled(hidden=136, heads=4, kv=2, head_dim=40, layers=2, experts=4, topk=2, moe_i=136, shared_i=136,
                  audio_d=32, audio_heads=4, audio_layers=2, audio_ffn=64, down_hidden=8, n_window_infer=200,
                  talker_hidden=144, talker_heads=4, talker_kv=2, talker_layers=2, talker_experts=4,
                  talker_topk=2, talker_moe_i=136, cp_hidden=144, cp_layers=2, cp_heads=4, cp_kv=2,
                  cp_head_dim=8, groups=4, codebook=64, c2w_hidden=32, c2w_layers=2, c2w_heads=4,
                  decoder_dim=64, sliding_window=8, accept_layer=1, section=[8, 6, 6])
    cfg["thinker_config"]["text_config"]["mlp_only_layers"] = [0]
    return cfg


def small_config() -> dict[str, Any]:
    """Tens of M params: big enough that per-op overheads stop dominating CPU benchmarks."""
    return _scaled(hidden=256, heads=8, kv=2, head_dim=64, layers=4, experts=32, topk=4, moe_i=128, shared_i=256,
                   audio_d=256, audio_heads=4, audio_layers=4, audio_ffn=1024, down_hidden=64,
                   n_window_infer=800, talker_hidden=256, talker_heads=8, talker_kv=2, talker_layers=4,
                   talker_experts=32, talker_topk=4, talker_moe_i=128, cp_hidden=256, cp_layers=2, cp_heads=4,
                   cp_kv=2, cp_head_dim=64, groups=8, codebook=256, c2w_hidden=256, c2w_layers=2, c2w_heads=4,
                   decoder_dim=256, sliding_window=72, accept_layer=2, section=[16, 8, 8])


def full_config(layers: int | None = None) -> dict[str, Any]:
    """The released config; ``layers`` overrides the depth of every stack (``full-1layer`` uses 1)."""
    cfg = released_config()
    if layers is not None:
        cfg["thinker_config"]["text_config"]["num_hidden_layers"] = layers
        cfg["thinker_config"]["audio_config"]["encoder_layers"] = layers
        cfg["thinker_config"]["vision_config"]["depth"] = layers
        cfg["thinker_config"]["vision_config"]["deepstack_visual_indexes"] = [0]
        cfg["talker_config"]["text_config"]["num_hidden_layers"] = layers
        cfg["talker_config"]["code_predictor_config"]["num_hidden_layers"] = layers
        cfg["talker_config"]["code_predictor_config"]["layer_types"] = ["full_attention"] * layers
        cfg["talker_config"]["accept_hidden_layer"] = min(cfg["talker_config"]["accept_hidden_layer"], layers)
        cfg["code2wav_config"]["num_hidden_layers"] = layers
    return cfg


NAMED = {
    "tiny": tiny_config,
    "tiny-wide": tiny_wide_config,
    "small": small_config,
    "full-1layer": lambda: full_config(layers=1),
    "full": full_config,
}


def resolve_config(config: str | dict | os.PathLike) -> dict[str, Any]:
    """A config dict from a name in NAMED, a dict (copied), or a path to a config.json / checkpoint dir."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    name = os.fspath(config)
    if name in NAMED:
        return NAMED[name]()
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ValueError(f"config must be one of {sorted(NAMED)}, a dict, or a path to config.json; got {config!r}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)

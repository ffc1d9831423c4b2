"""Config parsing: the released config, text-only checkpoints, and errors that name the field."""
import copy
import json
import os

import pytest

from omni_rt.config import OmniConfig
from omni_rt.errors import ConfigError
from omni_rt.testing import full_config, tiny_config

RELEASED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs",
                        "qwen3-omni-30b-a3b-instruct.json")


def released() -> dict:
    if os.path.isfile(RELEASED):
        with open(RELEASED) as f:
            return json.load(f)
    return full_config()  # the packaged copy of the same file


def test_released_config_sizes_match_the_notes():
    c = OmniConfig.from_dict(released())
    a, t = c.thinker.audio, c.thinker.text
    assert (a.encoder_layers, a.d_model, a.encoder_attention_heads, a.head_dim, a.encoder_ffn_dim) == (32, 1280, 20, 64, 5120)
    assert (a.num_mel_bins, a.downsample_hidden_size, a.n_window, a.n_window_infer, a.output_dim) == (128, 480, 50, 800, 2048)
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (48, 2048, 32, 4, 128)
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.vocab_size) == (128, 8, 768, 152064)
    assert t.rope_theta == 1e6 and t.mrope_section == (24, 20, 20) and t.norm_topk_prob
    k = c.talker.text
    assert (k.num_hidden_layers, k.hidden_size, k.num_attention_heads, k.num_key_value_heads, k.head_dim) == (20, 1024, 16, 2, 128)
    assert (k.num_experts, k.num_experts_per_tok, k.moe_intermediate_size, k.shared_expert_intermediate_size) == (128, 6, 384, 768)
    assert k.vocab_size == 3072 and c.talker.accept_hidden_layer == 24
    p = c.talker.code_predictor
    assert (p.num_hidden_layers, p.hidden_size, p.num_attention_heads, p.num_key_value_heads, p.head_dim) == (5, 1024, 16, 8, 128)
    assert (p.intermediate_size, p.vocab_size, p.num_code_groups) == (3072, 2048, 16)
    w = c.code2wav
    assert (w.num_quantizers, w.codebook_size, w.num_hidden_layers, w.hidden_size, w.sliding_window) == (16, 2048, 8, 1024, 72)
    assert w.decoder_dim == 1536 and w.total_upsample == 1920 and w.rope_theta == 1e4
    assert c.talker.speaker("Ethan") == 2302 and c.talker.speaker("CHELSIE") == 2301
    assert (c.talker.codec_pad_id, c.talker.codec_bos_id, c.talker.codec_eos_token_id) == (2148, 2149, 2150)
    assert (c.tts_pad_token_id, c.tts_bos_token_id, c.tts_eos_token_id) == (151671, 151672, 151673)
    assert c.thinker.audio_token_id == 151675 and c.im_end_token_id == 151645 and c.has_talker


def test_unknown_speaker_lists_valid_ones():
    c = OmniConfig.from_dict(released())
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        c.talker.speaker("bob")


@pytest.mark.parametrize("mutate", [
    lambda d: d.__setitem__("enable_audio_output", False),
    lambda d: (d.pop("talker_config"), d.pop("code2wav_config")),
])
def test_text_only_checkpoints(mutate):
    d = released()
    mutate(d)
    c = OmniConfig.from_dict(d)
    assert not c.has_talker and c.talker is None and not c.enable_audio_output
    assert c.thinker.text.num_hidden_layers == 48


@pytest.mark.parametrize("path, value, field", [
    (("thinker_config", "text_config", "num_experts"), None, "thinker_config.text_config.num_experts"),
    (("thinker_config", "text_config", "hidden_size"), "big", "thinker_config.text_config.hidden_size"),
    (("thinker_config", "text_config", "num_key_value_heads"), 5, "thinker_config.text_config.num_key_value_heads"),
    (("thinker_config", "audio_config", "d_model"), -1, "thinker_config.audio_config.d_model"),
    (("talker_config", "text_config", "shared_expert_intermediate_size"), None,
     "talker_config.text_config.shared_expert_intermediate_size"),
    (("talker_config", "speaker_id"), None, "talker_config.speaker_id"),
    (("talker_config", "spatial_merge_size"), None, "talker_config.spatial_merge_size"),
    (("code2wav_config", "upsample_rates"), "8,5", "code2wav_config.upsample_rates"),
    (("thinker_config", "text_config", "rope_parameters", "mrope_section"), [1, 2, 3],
     "thinker_config.text_config.rope_parameters.mrope_section"),
])
def test_bad_field_is_named(path, value, field):
    d = copy.deepcopy(released())
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is None:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        OmniConfig.from_dict(d)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        OmniConfig.from_file(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OmniConfig.from_file(tmp_path)


def test_tiny_config_keeps_structural_features():
    c = OmniConfig.from_dict(tiny_config())
    t = c.thinker.text
    assert t.num_experts_per_tok > 1 and t.num_key_value_heads < t.num_attention_heads
    assert t.num_attention_heads * t.head_dim > t.hidden_size  # q_proj wider than hidden
    assert c.thinker.audio.n_window == 50 and c.thinker.audio.n_window_infer == 200  # 26-token windows
    assert c.talker.num_code_groups >= 4 and c.talker.text.vocab_size == c.code2wav.codebook_size + 1024
    assert c.code2wav.total_upsample == 1920

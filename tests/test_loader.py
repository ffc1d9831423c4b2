"""Checkpoint layout, make_checkpoint and the loader, checked against transformers."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_rt.config import OmniConfig
from omni_rt.errors import CheckpointError
from omni_rt.layout import checkpoint_layout, model_layout
from omni_rt.loader import load_state_dict
from omni_rt.testing import make_checkpoint
from omni_rt.testing.hf import hf_to_omni_name

transformers = pytest.importorskip("transformers")


def test_transformers_loads_make_checkpoint_with_no_missing_keys(tiny_checkpoint):
    _, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_make_checkpoint_is_deterministic_per_seed(tmp_path):
    a = load_file(os.path.join(make_checkpoint(tmp_path / "a", "tiny", seed=3), "model.safetensors"))
    b = load_file(os.path.join(make_checkpoint(tmp_path / "b", "tiny", seed=3), "model.safetensors"))
    c = load_file(os.path.join(make_checkpoint(tmp_path / "c", "tiny", seed=4), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["thinker.lm_head.weight"], c["thinker.lm_head.weight"])
    # unit-gain init: a linear layer's output has ~unit scale for unit-scale input
    w = a["thinker.model.layers.0.self_attn.q_proj.weight"]
    assert 0.5 < (w @ torch.randn(w.shape[1], 256)).std() < 2


def test_save_pretrained_checkpoint_loads_with_every_tensor_equal(hf_tiny, tmp_path):
    hf_tiny.save_pretrained(tmp_path / "saved", max_shard_size="200KB")  # sharded + index
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
    cfg, ours = load_state_dict(tmp_path / "saved", torch.float32, "cpu")
    ref = {hf_to_omni_name(k): v for k, v in hf_tiny.state_dict().items()}  # the vision tower included
    assert set(ours) == set(ref) == set(model_layout(cfg))
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name


def test_loader_casts_dtype(tiny_checkpoint):
    _, sd = load_state_dict(tiny_checkpoint, torch.bfloat16, "cpu")
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def _copy_ckpt(src, dst, mutate):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    mutate(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    d = _copy_ckpt(tiny_checkpoint, tmp_path / "m", lambda t: t.pop("thinker.model.norm.weight"))
    with pytest.raises(CheckpointError, match="thinker.model.norm.weight"):
        load_state_dict(d)


def test_unexpected_tensor_names_tensor_and_file(tiny_checkpoint, tmp_path):
    d = _copy_ckpt(tiny_checkpoint, tmp_path / "u", lambda t: t.__setitem__("thinker.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"thinker\.extra\.weight.*model\.safetensors"):
        load_state_dict(d)


def test_misshaped_tensor_names_tensor_and_file(tiny_checkpoint, tmp_path):
    name = "thinker.model.layers.1.mlp.experts.3.up_proj.weight"
    d = _copy_ckpt(tiny_checkpoint, tmp_path / "s", lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"{name}.*model\.safetensors.*\(3, 3\)"):
        load_state_dict(d)


def test_missing_directory_and_shard(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent")
    d = make_checkpoint(tmp_path / "sharded", "tiny", max_shard_bytes=200_000)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    assert len(files) > 1
    load_state_dict(d)  # a sharded checkpoint loads
    os.remove(os.path.join(d, files[-1]))
    with pytest.raises(CheckpointError, match="missing file"):
        load_state_dict(d)


@pytest.mark.parametrize("name", ["full", "small", "tiny"])
def test_layout_matches_transformers_on_meta(name):
    """Every name and shape of the layout is what transformers' model holds (meta device), for the released
    config and the synthetic ones."""
    from omni_rt.testing import resolve_config

    cfg_dict = resolve_config(name)
    hf_cfg = transformers.Qwen3OmniMoeConfig(**cfg_dict)
    with torch.device("meta"):
        hf = transformers.Qwen3OmniMoeForConditionalGeneration(hf_cfg)
    ours = checkpoint_layout(OmniConfig.from_dict(cfg_dict))
    hf_mem = {hf_to_omni_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    # transformers keeps experts stacked in memory and splits them on save: expand to the on-disk names.
    expected = {}
    for name, shape in hf_mem.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            e, two_i, h = shape
            for j in range(e):
                expected[f"{name[:-len('gate_up_proj')]}{j}.gate_proj.weight"] = (two_i // 2, h)
                expected[f"{name[:-len('gate_up_proj')]}{j}.up_proj.weight"] = (two_i // 2, h)
        elif name.endswith("mlp.experts.down_proj"):
            for j in range(shape[0]):
                expected[f"{name[:-len('down_proj')]}{j}.down_proj.weight"] = shape[1:]
        else:
            expected[name] = shape
    assert ours == expected
    if name == "full":
        assert sum(torch.Size(s).numel() for s in ours.values()) > 3.0e10  # ~31.7 B + talker + code2wav


# ------------------------------------------------------------------------------ fused q/k/v and gate/up
def test_fused_parameters_are_the_on_disk_parts_concatenated(tiny_checkpoint):
    """q/k/v (with the AuT's biases) and the dense MLPs' gate/up are one parameter each in memory: the on-disk
    matrices stacked in part order. Every other parameter keeps its checkpoint name."""
    from omni_rt.layout import fused_layout
    from omni_rt.models.omni import load_model

    disk = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    model = load_model(tiny_checkpoint)
    params = dict(model.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == fused_layout(model_layout(model.cfg))
    for p in ("thinker.model.layers.0.self_attn", "talker.model.layers.1.self_attn",
              "talker.code_predictor.model.layers.0.self_attn", "code2wav.pre_transformer.layers.1.self_attn"):
        assert torch.equal(params[f"{p}.qkv_proj.weight"], torch.cat([disk[f"{p}.{x}_proj.weight"] for x in "qkv"]))
    a = "thinker.audio_tower.layers.1.self_attn"
    for leaf in ("weight", "bias"):
        assert torch.equal(params[f"{a}.qkv_proj.{leaf}"], torch.cat([disk[f"{a}.{x}_proj.{leaf}"] for x in "qkv"]))
    for p in ("talker.model.layers.0.mlp.shared_expert", "talker.code_predictor.model.layers.1.mlp",
              "code2wav.pre_transformer.layers.0.mlp"):
        assert torch.equal(params[f"{p}.gate_up_proj.weight"],
                           torch.cat([disk[f"{p}.gate_proj.weight"], disk[f"{p}.up_proj.weight"]]))
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in params)


def _attention():
    from omni_rt.models.layers import Attention, DenseMLP

    with torch.device("meta"):
        m = torch.nn.ModuleDict({"self_attn": Attention(16, 2, 1, 8, 1e-6), "mlp": DenseMLP(16, 12)})
    w = {"self_attn.q_proj.weight": torch.randn(16, 16), "self_attn.k_proj.weight": torch.randn(8, 16),
         "self_attn.v_proj.weight": torch.randn(8, 16), "self_attn.o_proj.weight": torch.randn(16, 16),
         "self_attn.q_norm.weight": torch.ones(8), "self_attn.k_norm.weight": torch.ones(8),
         "mlp.gate_proj.weight": torch.randn(12, 16), "mlp.up_proj.weight": torch.randn(12, 16),
         "mlp.down_proj.weight": torch.randn(16, 12)}
    return m, w


def test_assign_parameters_fuses_parts_in_any_order_and_stays_strict():
    from omni_rt.loader import assign_parameters

    m, w = _attention()
    assign_parameters(m, reversed(list(w.items())))       # v before k before q: rows still q, k, v
    assert torch.equal(m["self_attn"].qkv_proj.weight, torch.cat([w[f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(m["mlp"].gate_up_proj.weight, torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]))

    bad = dict(w, **{"self_attn.k_proj.weight": torch.randn(9, 16)})
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight.*\(9, 16\).*\(8, 16\)"):
        assign_parameters(_attention()[0], bad.items())
    missing = {k: v for k, v in w.items() if k != "self_attn.v_proj.weight"}
    with pytest.raises(CheckpointError, match=r"self_attn\.v_proj\.weight"):
        assign_parameters(_attention()[0], missing.items())
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight"):
        assign_parameters(_attention()[0], [(k, v) for k, v in w.items() if k != "mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj\.weight.*twice"):
        assign_parameters(_attention()[0], list(w.items()) + [("self_attn.q_proj.weight", w["self_attn.q_proj.weight"])])
    with pytest.raises(CheckpointError, match=r"self_attn\.w_proj\.weight"):
        assign_parameters(_attention()[0], list(w.items()) + [("self_attn.w_proj.weight", torch.ones(2, 2))])


def test_torch_load_state_dict_takes_the_checkpoint_names():
    """``module.load_state_dict`` with transformers' separate names (what the reference's state_dict holds) fills
    the fused parameters too; a missing part stays a missing-key error."""
    m, w = _attention()
    m = m.to_empty(device="cpu")
    m.load_state_dict(w, strict=True)
    assert torch.equal(m["self_attn"].qkv_proj.weight, torch.cat([w[f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    with pytest.raises(RuntimeError, match="qkv_proj"):
        m.load_state_dict({k: v for k, v in w.items() if k != "self_attn.k_proj.weight"}, strict=True)

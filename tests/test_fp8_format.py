"""Block-FP8 format: quantization_config validation, the quantizer (round-to-nearest-even codes, scale = block
amax / 448, partial edge blocks, fused parts on their own grids), make_checkpoint(quantization="fp8") writing
Qwen's layout, the loader's errors for bad FP8 checkpoints, and both formats giving the same weights."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omni_rt.config import OmniConfig
from omni_rt.errors import CheckpointError
from omni_rt.layout import checkpoint_layout
from omni_rt.loader import load_state_dict
from omni_rt.quant import (dequantize_blockwise, is_fp8_eligible, quantize_blockwise, quantize_parts,
                           scale_row_map)
from omni_rt.testing import make_checkpoint, tiny_config

QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def independent_quantize(w: torch.Tensor, b: int = 128):
    """Per-block loop: scale = amax / 448, codes = (w / scale).to(e4m3) (round to nearest even)."""
    n, k = w.shape
    q = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    s = torch.zeros(math.ceil(n / b), math.ceil(k / b))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            amax = blk.abs().max()
            s[i, j] = amax / 448.0
            if amax > 0:
                q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value,match", [
    ("quant_method", "awq", "quantization_config.quant_method"),
    ("fmt", "e5m2", "quantization_config.fmt"),
    ("weight_block_size", [64, 64], "quantization_config.weight_block_size"),
    ("weight_block_size", [128], "quantization_config.weight_block_size"),
    ("activation_scheme", "static", "quantization_config.activation_scheme"),
    ("modules_to_not_convert", [1, 2], "quantization_config.modules_to_not_convert"),
])
def test_bad_quantization_config_names_the_field(field, value, match):
    cfg = tiny_config()
    cfg["quantization_config"] = dict(QC, **{field: value})
    with pytest.raises(CheckpointError, match=match):
        OmniConfig.from_dict(cfg)


def test_quantization_config_parsed():
    cfg = tiny_config()
    cfg["quantization_config"] = dict(QC, modules_to_not_convert=["lm_head", "model.layers.0.mlp.gate"])
    q = OmniConfig.from_dict(cfg).quantization
    assert q.weight_block_size == (128, 128) and q.keeps("thinker.lm_head")
    assert q.keeps("thinker.model.layers.0.mlp.gate") and not q.keeps("thinker.model.layers.0.mlp.gate_proj")
    assert OmniConfig.from_dict(tiny_config()).quantization is None


# ------------------------------------------------------------------------------------------ quantizer
@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (136, 129), (256, 128), (300, 7)])
def test_quantize_blockwise_equals_independent_loop(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    w[0, :3] = 0.0
    q, s = quantize_blockwise(w)
    q2, s2 = independent_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(s, s2)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    deq = dequantize_blockwise(q, s, torch.float32)
    # e4m3: 3 mantissa bits → relative rounding error ≤ 2**-4 of each element (normal range), small abs floor
    bound = w.abs() * 2 ** -4 + s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]] * 2 ** -9
    assert ((deq - w).abs() <= bound + 1e-12).all()


def test_quantize_rounds_to_nearest_even_and_zero_blocks():
    w = torch.zeros(130, 130)
    w[0, 0] = 448.0                     # scale 1 for block (0, 0): codes are the values themselves
    w[0, 1], w[0, 2] = 1.0625, 1.1875   # ties between e4m3 neighbours (1.0, 1.125) and (1.125, 1.25) → even
    q, s = quantize_blockwise(w)
    assert s[0, 0] == 1.0 and s[1, 1] == 0.0 and s[0, 1] == 0.0
    assert q[0, 1].float() == 1.0 and q[0, 2].float() == 1.25
    assert (q[128:, 128:].float() == 0).all()


def test_fused_parts_keep_their_grids():
    gate, up = torch.randn(136, 200), torch.randn(136, 200) * 5
    q, s = quantize_parts(torch.cat([gate, up]), (136, 136))
    assert s.shape == (4, 2)                      # 2 scale rows per part, not ceil(272/128) = 3
    qg, sg = quantize_blockwise(gate)
    qu, su = quantize_blockwise(up)
    assert torch.equal(s, torch.cat([sg, su])) and torch.equal(q.view(torch.uint8), torch.cat([qg, qu]).view(torch.uint8))
    assert scale_row_map((136, 136), 128).tolist() == [0] * 128 + [1] * 8 + [2] * 128 + [3] * 8
    both = dequantize_blockwise(q, s, torch.float32, parts=(136, 136))
    assert torch.equal(both, torch.cat([dequantize_blockwise(qg, sg, torch.float32),
                                        dequantize_blockwise(qu, su, torch.float32)]))


def test_eligible_modules():
    yes = ["thinker.model.layers.3.self_attn.q_proj.weight", "talker.model.layers.0.self_attn.o_proj.weight",
           "thinker.model.layers.0.mlp.gate_proj.weight", "thinker.model.layers.1.mlp.experts.7.down_proj.weight",
           "talker.model.layers.2.mlp.shared_expert.up_proj.weight"]
    no = ["thinker.lm_head.weight", "talker.codec_head.weight", "thinker.model.layers.0.mlp.gate.weight",
          "talker.model.layers.0.mlp.shared_expert_gate.weight", "talker.text_projection.linear_fc1.weight",
          "talker.code_predictor.model.layers.0.mlp.up_proj.weight", "thinker.audio_tower.layers.0.fc1.weight",
          "code2wav.pre_transformer.layers.0.mlp.up_proj.weight", "thinker.model.embed_tokens.weight",
          "thinker.model.layers.0.self_attn.q_norm.weight", "thinker.visual.blocks.0.attn.qkv.weight"]
    assert all(is_fp8_eligible(n) for n in yes)
    assert not any(is_fp8_eligible(n) for n in no)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8tiny"), "tiny-wide", seed=1, quantization="fp8",
                           with_tokenizer=False)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("plaintiny"), "tiny-wide", seed=1, with_tokenizer=False)


def _tensors(path):
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def test_make_checkpoint_writes_qwen_block_fp8(fp8_ckpt, plain_ckpt):
    with open(os.path.join(fp8_ckpt, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert {k: qc[k] for k in QC} == QC
    skip = set(qc["modules_to_not_convert"])
    assert {"thinker.lm_head", "talker.codec_head", "thinker.model.layers.1.mlp.gate",
            "talker.model.layers.0.mlp.shared_expert_gate", "talker.text_projection.linear_fc1"} <= skip
    t, plain = _tensors(fp8_ckpt), _tensors(plain_ckpt)
    n_fp8 = 0
    for name, w in plain.items():
        if is_fp8_eligible(name):
            n_fp8 += 1
            assert t[name].dtype == torch.float8_e4m3fn
            q, s = independent_quantize(w)
            assert torch.equal(t[name + "_scale_inv"], s)
            assert torch.equal(t[name].view(torch.uint8), q.view(torch.uint8))
            assert name[: -len(".weight")] not in skip
        else:
            assert torch.equal(t[name], w) and name + "_scale_inv" not in t
    assert n_fp8 > 0 and len(t) == len(plain) + n_fp8


def test_both_formats_load_to_the_same_weights(fp8_ckpt, plain_ckpt):
    _, pre = load_state_dict(fp8_ckpt)
    _, at_load = load_state_dict(plain_ckpt, quantize=True)
    assert pre.keys() == at_load.keys()
    assert all(torch.equal(pre[k], at_load[k]) for k in pre)
    _, kept_pre = load_state_dict(fp8_ckpt, keep_fp8=True)
    _, kept_load = load_state_dict(plain_ckpt, quantize=True, keep_fp8=True)
    assert kept_pre.keys() == kept_load.keys()
    for k in kept_pre:
        a, b = kept_pre[k], kept_load[k]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                                  b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    gu = "thinker.model.layers.1.mlp.experts.gate_up_proj"
    assert kept_pre[gu].dtype == torch.float8_e4m3fn and kept_pre[gu + "_scale_inv"].shape == (4, 4, 2)
    raw = _tensors(fp8_ckpt)
    e3 = "thinker.model.layers.1.mlp.experts.3"
    assert torch.equal(kept_pre[gu + "_scale_inv"][3], torch.cat([raw[f"{e3}.gate_proj.weight_scale_inv"],
                                                                  raw[f"{e3}.up_proj.weight_scale_inv"]]))


def _rewrite(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with ``edit(tensors)`` applied (single-file checkpoints)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        data = open(os.path.join(src, f), "rb").read() if not f.endswith(".safetensors") else None
        if data is not None:
            open(os.path.join(dst, f), "wb").write(data)
    t = _tensors(src)
    edit(t)
    save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


Q = "thinker.model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(Q + "_scale_inv"), Q + "_scale_inv"),
    (lambda t: t.__setitem__(Q + "_scale_inv", torch.ones(1, 1)), Q + "_scale_inv"),
    (lambda t: t.__setitem__(Q + "_scale_inv", torch.ones(2, 2, dtype=torch.int32)), Q + "_scale_inv"),
    (lambda t: t.__setitem__(Q, t[Q].float()), Q),
    (lambda t: t.__setitem__("thinker.lm_head.weight_scale_inv", torch.ones(5, 5)), "thinker.lm_head.weight_scale_inv"),
])
def test_bad_fp8_checkpoint_is_a_checkpoint_error_naming_the_tensor(fp8_ckpt, tmp_path, edit, match):
    bad = _rewrite(fp8_ckpt, str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=match.replace(".", r"\.")):
        load_state_dict(bad)


def test_scale_of_an_uneligible_weight_is_dequantized(fp8_ckpt, tmp_path):
    """Other producers quantize more modules (e.g. lm_head): accepted, dequantized at load even when FP8 is kept."""
    name = "thinker.lm_head.weight"

    def edit(t):
        t[name], t[name + "_scale_inv"] = quantize_blockwise(t[name])

    path = _rewrite(fp8_ckpt, str(tmp_path / "more"), edit)
    _, w = load_state_dict(path, keep_fp8=True)
    q, s = quantize_blockwise(_tensors(fp8_ckpt)[name])
    assert w[name].dtype == torch.float32 and torch.equal(w[name], dequantize_blockwise(q, s, torch.float32))


def test_layout_lists_scales_only_for_quantized_configs():
    cfg = tiny_config()
    plain = checkpoint_layout(OmniConfig.from_dict(cfg))
    cfg["quantization_config"] = dict(QC, modules_to_not_convert=["thinker.model.layers.0.self_attn.q_proj"])
    quant = checkpoint_layout(OmniConfig.from_dict(cfg))
    extra = set(quant) - set(plain)
    assert extra and all(n.endswith(".weight_scale_inv") for n in extra)
    assert Q + "_scale_inv" not in extra      # listed in modules_to_not_convert
    assert "thinker.model.layers.0.self_attn.k_proj.weight_scale_inv" in extra


def test_bad_quantization_argument(plain_ckpt):
    import omni_rt
    from omni_rt.cli import build_parser

    with pytest.raises(ValueError, match="quantization"):
        omni_rt.Runtime(plain_ckpt, device="cpu", quantization="int4")
    with pytest.raises(ValueError, match="quantization"):
        make_checkpoint(os.path.join(plain_ckpt, "x"), "tiny", quantization="fp4")
    assert build_parser().parse_args(["bench", "--synthetic", "tiny", "--quant", "fp8"]).quant == "fp8"
    assert build_parser().parse_args(["run", "--model", "d"]).quant is None


def _fused_param(params: dict, owner: str, fused: str, leaf: str) -> torch.Tensor:
    """``{owner}.{fused}.{leaf}``, or — for the talker's shared expert, which loading folds into the routed experts
    when its width is theirs (``SparseMoE.fuse_shared_expert``: then it is the one extra, last expert) — that
    expert's slice of the stacked ``experts.gate_up_proj`` (``leaf`` "weight") or its scale grid."""
    name = f"{owner}.{fused}.{leaf}"
    if name in params:
        return params[name]
    stacked = owner.rsplit(".", 1)[0] + ".experts.gate_up_proj" + ("" if leaf == "weight" else "_scale_inv")
    return params[stacked][-1]


def test_fused_fp8_weights_keep_each_parts_grid(fp8_ckpt, plain_ckpt):
    """Kept FP8 (sm_90): q/k/v and the shared expert's gate/up are one FP8 parameter each whose scale grid is the
    parts' own grids stacked (the tiny-wide widths are not multiples of 128, so the parts' edge blocks do not
    line up with 128-row blocks of the fused weight); dequantized (CPU/sm_80) they are the parts concatenated."""
    from omni_rt.models.omni import load_model

    raw = _tensors(fp8_ckpt)
    kept = dict(load_model(fp8_ckpt, keep_fp8=True).named_parameters())
    deq = dict(load_model(fp8_ckpt).named_parameters())
    at_load = dict(load_model(plain_ckpt, quantization="fp8", keep_fp8=True).named_parameters())
    for owner, fused, names in (("thinker.model.layers.0.self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                ("talker.model.layers.0.mlp.shared_expert", "gate_up_proj", ("gate_proj", "up_proj"))):
        parts = [f"{owner}.{n}.weight" for n in names]
        assert any(raw[p].shape[0] % 128 for p in parts)
        w, s = _fused_param(kept, owner, fused, "weight"), _fused_param(kept, owner, fused, "weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn
        assert torch.equal(w.view(torch.uint8), torch.cat([raw[p].view(torch.uint8) for p in parts]))
        assert torch.equal(s, torch.cat([raw[p + "_scale_inv"].float() for p in parts]))
        want = torch.cat([dequantize_blockwise(raw[p], raw[p + "_scale_inv"].float(), torch.float32) for p in parts])
        assert torch.equal(_fused_param(deq, owner, fused, "weight"), want)
        rows = tuple(raw[p].shape[0] for p in parts)
        assert torch.equal(dequantize_blockwise(w, s, torch.float32, parts=rows), want)
        # quantized at load (streaming, each on-disk part on its own grid before the fusion): the same
        assert torch.equal(_fused_param(at_load, owner, fused, "weight").view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(_fused_param(at_load, owner, fused, "weight_scale_inv"), s)

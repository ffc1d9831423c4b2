"""Block-FP8 weights end to end, on the ``tiny-wide`` fixture (widths not multiples of 128: every scale grid has
partial edge blocks, fused gate/up parts do not line up on 128 rows).

With weight-only FP8 the math is "fp32 compute on dequantized weights", so the truth is transformers run on a
checkpoint this file dequantizes itself (fp32, CPU) — not transformers' own FP8 loader, which derives the block
size as rows ÷ scale rows (wrong for partial blocks) and refuses to run without a GPU. Both formats are checked:
a prequantized checkpoint (``make_checkpoint(..., quantization="fp8")``) and quantization at load
(``Runtime(..., quantization="fp8")`` on the unquantized checkpoint of the same seed).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import omni_rt
from omni_rt.bench import question_prompt, spoken_question
from omni_rt.models.omni import build_meta_model, load_model
from omni_rt.testing import make_checkpoint

from _tolerances import PARITY
from test_runtime_speech import hf_generate

T_GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=8)
K_GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=20)


def dequantize_checkpoint(src: str, dst: str) -> str:
    """Write ``src`` (block-FP8) as an fp32 checkpoint: w = codes · scale[n // 128, k // 128], written here
    independently of omni_rt.quant; config.json without quantization_config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    block = cfg.pop("quantization_config")["weight_block_size"]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    for file in sorted(os.listdir(src)):
        if file.endswith(".safetensors"):
            out = {}
            with safe_open(os.path.join(src, file), "pt") as f:
                names = set(f.keys())
                for n in names:
                    if n.endswith("_scale_inv"):
                        continue
                    t = f.get_tensor(n)
                    if n + "_scale_inv" in names:
                        s = f.get_tensor(n + "_scale_inv").float()
                        rows, cols = t.shape
                        full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
                        t = t.float() * full
                    out[n] = t.float()
            save_file(out, os.path.join(dst, file), metadata={"format": "pt"})
        else:
            assert not file.endswith(".index.json"), "single-file checkpoints only"
    return dst


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(unquantized fp32 checkpoint, its block-FP8 twin, the FP8 twin dequantized to fp32) — same seed."""
    root = tmp_path_factory.mktemp("fp8")
    src = make_checkpoint(root / "fp32", "tiny-wide", seed=3, dtype=torch.float32, with_tokenizer=False)
    fp8 = make_checkpoint(root / "fp8", "tiny-wide", seed=3, dtype=torch.float32, with_tokenizer=False,
                          quantization="fp8")
    return str(src), str(fp8), dequantize_checkpoint(str(fp8), str(root / "dequant"))


@pytest.fixture(scope="module")
def hf_dequant(wide):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(wide[2], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def question(wide):
    from omni_rt.config import OmniConfig

    return question_prompt(OmniConfig.from_file(wide[0]), spoken_question(1.5))


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", ["prequantized", "at_load"])
def test_fp8_speech_equals_transformers_on_dequantized_weights(wide, hf_dequant, question, fmt):
    src, fp8, _ = wide
    path, quant = (fp8, None) if fmt == "prequantized" else (src, "fp8")
    ids, codes, wav = hf_generate_with(hf_dequant, question)
    with omni_rt.Runtime(path, device="cpu", max_batch_size=2, quantization=quant) as rt:
        out = rt.generate(question, speaker="ethan", thinker=T_GREEDY, talker=K_GREEDY)
    assert out.token_ids == ids
    assert out.codes.shape == codes.shape and np.array_equal(out.codes, codes)
    assert codes.shape[1] >= 10, "the fixture should speak"
    assert out.audio.shape == wav.shape
    assert np.abs(out.audio - wav).max() <= PARITY["waveform_abs"]


_HF_CACHE: dict = {}


def hf_generate_with(hf, prompt):
    """transformers' greedy speech for ``prompt`` (cached: both formats compare against one reference run)."""
    key = (id(hf), tuple(prompt.token_ids))
    if key not in _HF_CACHE:
        import test_runtime_speech as trs

        saved = trs.T_GREEDY, trs.K_GREEDY
        trs.T_GREEDY, trs.K_GREEDY = T_GREEDY, K_GREEDY
        try:
            _HF_CACHE[key] = hf_generate(hf, prompt, "ethan")
        finally:
            trs.T_GREEDY, trs.K_GREEDY = saved
    return _HF_CACHE[key]


def test_quantized_model_differs_from_unquantized(wide):
    """The FP8 path really changes the weights (so the parity above is not the fp32 model's by accident)."""
    src, fp8, _ = wide
    a = dict(load_model(src).named_parameters())
    b = dict(load_model(fp8).named_parameters())
    name = "thinker.model.layers.1.mlp.experts.gate_up_proj"
    assert a[name].dtype == b[name].dtype == torch.float32
    err = (a[name] - b[name]).abs().max().item()
    assert 0 < err <= a[name].abs().max().item() / 16   # e4m3 has 3 mantissa bits: ≤ 2**-4 relative per block
    assert torch.equal(a["thinker.lm_head.weight"], b["thinker.lm_head.weight"])  # not quantized


def test_kept_fp8_model_matches_meta_build_and_dequantized_forward(wide):
    """keep_fp8 (what sm_90 does) on CPU: parameter names/dtypes/shapes equal the meta-device build used for
    memory planning, and one thinker forward equals the dequantized model's (the CPU FP8 path is the
    dequantize-then-matmul reference)."""
    from omni_rt.models.layers import AttentionMetadata

    _, fp8, _ = wide
    kept = load_model(fp8, keep_fp8=True)
    deq = load_model(fp8)
    meta = build_meta_model(kept.cfg, torch.float32, fp8=True)
    got = {n: (p.dtype, tuple(p.shape)) for n, p in kept.named_parameters()}
    want = {n: (p.dtype, tuple(p.shape)) for n, p in meta.named_parameters()}
    assert got == want
    assert kept.thinker.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.thinker.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    talker_moe = kept.talker.model.layers[0].mlp   # its shared expert folded into the FP8 experts (one part)
    assert talker_moe.num_shared == 1 and talker_moe.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert kept.talker.code_predictor.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32
    assert kept.weight_memory()["thinker"] < deq.weight_memory()["thinker"] / 2

    tc = kept.cfg.thinker.text
    t = 5
    ids = torch.tensor([3, 17, 42, 99, 7])
    pos = torch.arange(t).expand(3, t)
    meta_attn = AttentionMetadata(slot_mapping=torch.arange(t), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                                  context_lens=torch.tensor([t], dtype=torch.int32),
                                  cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32), max_query_len=t)
    outs = []
    with torch.inference_mode():
        for m in (kept, deq):
            caches = [(torch.zeros(1, 8, tc.num_key_value_heads, tc.head_dim),
                       torch.zeros(1, 8, tc.num_key_value_heads, tc.head_dim)) for _ in range(tc.num_hidden_layers)]
            h, _ = m.thinker(m.thinker.embed(ids), pos, caches, meta_attn)
            outs.append(m.thinker.logits(h))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def _prefill_logits(model, ids):
    from omni_rt.testing.agreement import teacher_forced_logits

    return teacher_forced_logits(model, ids)


def test_kept_fp8_thinker_with_triton_forced_equals_dequantized(wide):
    """The FP8 Triton kernels (fp8_linear weight-only and w8a8, fused_moe_fp8) inside the real model, under the
    interpreter: the kept-FP8 thinker's prefill logits equal the dequantized model's (weight-only) and stay
    close with w8a8 prefill activations."""
    from omni_rt.kernels import force_triton
    from omni_rt.models.layers import FP8Linear

    from _tolerances import rel_err

    _, fp8, _ = wide
    kept = load_model(fp8, keep_fp8=True, with_talker=False)
    deq = load_model(fp8, with_talker=False)
    ids = [3, 17, 42, 99, 7, 300, 12]
    ref = _prefill_logits(deq, ids)
    with force_triton():
        got = _prefill_logits(kept, ids)
    assert rel_err(got, ref) <= PARITY["logits_rel"]
    linears = [m for m in kept.modules() if isinstance(m, FP8Linear)]
    assert linears
    for m in linears:
        m.act_fp8_min_tokens = 4
    with force_triton():
        w8a8 = _prefill_logits(kept, ids)
    assert 0 < rel_err(w8a8, ref) <= 0.1
    # the MoE experts too (as Runtime(fp8_activations=True) sets them): a further change, still close
    from omni_rt.models.moe import SparseMoE

    moes = [m for m in kept.modules() if isinstance(m, SparseMoE)]
    assert moes and all(m.experts.gate_up_proj_scale_inv is not None for m in moes)
    for m in moes:
        m.act_fp8_min_tokens = 4
    with force_triton():
        w8a8_moe = _prefill_logits(kept, ids)
    assert not torch.equal(w8a8_moe, w8a8)
    assert 0 < rel_err(w8a8_moe, ref) <= 0.1

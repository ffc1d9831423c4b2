"""Block-FP8 weights: GEMM kernels against their bf16 counterparts, and model agreement with the unquantized model.

CUDA (sm_89+; unrun so far — no GPU was available when this was written):
- ``fp8_linear`` (weight-only w8a16 and w8a8) vs ``F.linear`` bf16 at the thinker's attention shapes
  (q_proj 4096×2048, the fused qkv_proj (4096+512+512)×2048 with each part on its own scale grid, o_proj
  2048×4096), M in {1, 16, 256, 4096}; extra_info: weight GB/s (FP8 bytes read).
- ``fused_moe_fp8`` vs bf16 ``fused_moe`` at the thinker MoE (E=128, H=2048, I=768, top-8), M in {1, 16, 64, 256};
  weight GB/s of the experts touched. H100 floor at M=1: 37.7 MB / 3.35 TB/s ≈ 11 µs per layer in FP8
  (22.5 µs in bf16). Random routing is near uniform: the worst case for expert reuse.
CPU: the Triton paths only run under the interpreter, so CPU timings compare the references on small shapes
(meaningless as absolute figures, a smoke run for the suite).

Agreement (not a timing; ``benchmark.pedantic`` runs it once and records the figures in extra_info, and prints
them): teacher-forced top-1 agreement and logit error of the FP8 thinker vs the unquantized one on the
reference's greedy continuations — ``small`` random weights on CPU (fp32 compute), the released widths with
8 layers on CUDA (bf16 compute). bf16-vs-fp32 agreement is given alongside for scale. Random weights give flat logits, so
agreement is far below what real checkpoints reach; it is a regression figure, not a quality claim.
"""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels import fp8_linear as fl
from omni_rt.kernels import fused_moe as fm
from omni_rt.kernels import fused_moe_fp8 as f8
from omni_rt.quant import quantize_blockwise, quantize_parts

CUDA = torch.cuda.is_available()
DENSE = {"q_proj": (4096, 2048), "qkv_proj": (5120, 2048), "o_proj": (2048, 4096)} if CUDA else \
    {"q_proj": (160, 136), "qkv_proj": (224, 136)}
PARTS = {"qkv_proj": (4096, 512, 512)} if CUDA else {"qkv_proj": (160, 32, 32)}   # fused: parts' own grids
MOE = (128, 2048, 768, 8) if CUDA else (8, 136, 72, 2)
PROMPTS = [[449, 11, 198, 100, 200, 300, 42, 450, 198, 449, 12, 198],
           [449, 11, 198, 7, 8, 9, 10, 300, 301, 302, 17, 18, 19, 450, 198, 449, 12, 198]]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("m", [1, 16, 256, 4096] if CUDA else [1, 16])
@pytest.mark.parametrize("shape", list(DENSE))
@pytest.mark.parametrize("impl", ["bf16", "w8a16", "w8a8"] if CUDA else ["bf16", "w8a16"])
def test_fp8_linear(benchmark, device, m, shape, impl):
    n, k = DENSE[shape]
    dtype = torch.bfloat16 if CUDA else torch.float32
    w = torch.randn(n, k, device=device) / k ** 0.5
    parts = PARTS.get(shape)
    q, s = quantize_blockwise(w) if parts is None else quantize_parts(w, parts)
    w = w.to(dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    if impl == "bf16":
        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        nbytes = n * k * w.element_size()
    else:
        fn = lambda: fl.fp8_linear(x, q, s, act_fp8=impl == "w8a8", parts=parts)  # noqa: E731
        nbytes = n * k + s.numel() * 4
    fn()
    _sync()

    def run():
        fn()
        _sync()

    benchmark(run)
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        benchmark.extra_info.update(weight_MB=nbytes / 1e6, GB_per_s=nbytes / sec / 1e9,
                                    TFLOP_per_s=2 * m * n * k / sec / 1e12,
                                    path="triton" if CUDA else "torch reference (CPU)")


@pytest.mark.parametrize("m", [1, 16, 64, 256, 2048] if CUDA else [1, 8])
@pytest.mark.parametrize("impl", ["bf16", "fp8", "fp8_w8a8"] if CUDA else ["bf16", "fp8"])
def test_fused_moe_fp8(benchmark, device, m, impl):
    e, hidden, inter, top_k = MOE
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(e, 2 * inter, hidden, device=device, generator=g) * 0.02
    down = torch.randn(e, hidden, inter, device=device, generator=g) * 0.02
    x = torch.randn(m, hidden, device=device, dtype=dtype, generator=g)
    weights, ids = fm.route(torch.randn(m, e, device=device, generator=g).to(dtype), top_k, True)
    if impl == "bf16":
        a, b = gate_up.to(dtype), down.to(dtype)
        fn = lambda: fm.fused_moe(x, a, b, weights, ids)  # noqa: E731
        itemsize = a.element_size()
    else:
        q1, s1 = quantize_parts(gate_up, (inter, inter))
        q2, s2 = quantize_blockwise(down)
        w8a8 = impl == "fp8_w8a8"   # prefill-sized calls only; decode-sized ones stay weight-only
        fn = lambda: f8.fused_moe_fp8(x, q1, q2, s1, s2, weights, ids, act_fp8=w8a8)  # noqa: E731
        itemsize = 1
    fn()
    _sync()

    def run():
        fn()
        _sync()

    benchmark(run)
    if benchmark.stats is not None:
        touched = int(torch.unique(ids).numel())
        nbytes = touched * 3 * inter * hidden * itemsize
        sec = benchmark.stats.stats.median
        benchmark.extra_info.update(experts_touched=touched, weight_MB=nbytes / 1e6, GB_per_s=nbytes / sec / 1e9,
                                    TFLOP_per_s=2 * m * top_k * 3 * inter * hidden / sec / 1e12)


def test_fp8_agreement_vs_unquantized(benchmark, device):
    """Teacher-forced top-1 agreement / logit error of FP8 weights vs the unquantized model (run once)."""
    from omni_rt.testing import build_synthetic_model
    from omni_rt.testing.agreement import agreement

    from omni_rt.testing.configs import full_config

    # CUDA: released widths, 8 layers (both models resident at once fit an 80 GB GPU).
    config = full_config(layers=8) if CUDA else "small"
    ref_dtype = torch.bfloat16 if CUDA else torch.float32
    results = {}

    def run():
        ref = build_synthetic_model(config, torch.float32 if not CUDA else torch.bfloat16, device, with_talker=False)
        fp8 = build_synthetic_model(config, ref_dtype, device, with_talker=False, fp8=True)
        results["fp8"] = agreement(ref, fp8, PROMPTS, steps=24)
        results["weights_GB"] = {"unquantized": ref.weight_memory()["total"] / 1e9,
                                 "fp8": fp8.weight_memory()["total"] / 1e9}
        del fp8
        if not CUDA:  # the bf16-vs-fp32 gap, for scale
            bf16 = build_synthetic_model(config, torch.bfloat16, device, with_talker=False)
            results["bf16_vs_fp32"] = agreement(ref, bf16, PROMPTS, steps=24)

    benchmark.pedantic(run, rounds=1, iterations=1)
    name = "released widths, 8 layers" if CUDA else "small"
    benchmark.extra_info.update({"config": name, **results})
    print(f"\nFP8 agreement ({name}, {'bf16' if CUDA else 'fp32'} compute): {results}")
    assert 0.0 <= results["fp8"]["top1_agreement"] <= 1.0

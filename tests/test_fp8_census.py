"""Bytes per decoded token with FP8 weights, from ``omni-rt census`` at the released shapes (meta device, the
engine's own decode step, every launch's bytes counted; runs once the census is on the branch).

Issue 15: thinker decode bytes at batch 1 with FP8 ≤ 0.6 × bf16 (lm_head, embeddings, routers and norms stay
bf16). The modelled time (roofline + launch floor) is printed, not asserted: it is a model, not a measurement.
"""
from __future__ import annotations

import pytest


def test_thinker_decode_bytes_with_fp8_at_most_0_6_of_bf16():
    census = pytest.importorskip("omni_rt.census").census
    bf16 = census("full", 1).records["thinker_decode"]
    fp8 = census("full", 1, quant="fp8").records["thinker_decode"]
    b16 = sum(x.bytes for x in bf16.launches)
    b8 = sum(x.bytes for x in fp8.launches)
    names = {x.name for x in fp8.launches}
    assert {"_fp8_linear_kernel", "_moe_gate_up_decode_kernel", "_moe_down_sum_kernel"} <= names
    # the MoE kernels read FP8 codes (SCALED launches): about half the bf16 expert bytes
    moe16 = sum(x.bytes for x in bf16.launches if x.name.startswith("_moe_"))
    moe8 = sum(x.bytes for x in fp8.launches if x.name.startswith("_moe_"))
    assert moe8 <= 0.55 * moe16
    print(f"thinker decode, batch 1: bf16 {b16 / 1e9:.3f} GB, fp8 {b8 / 1e9:.3f} GB ({b8 / b16:.3f}x); "
          f"modelled H100 {bf16.est_ms('h100'):.2f} ms -> {fp8.est_ms('h100'):.2f} ms")
    assert b8 <= 0.6 * b16
    assert b8 >= 0.45 * b16          # bf16 leftovers (lm_head, embedding row, routers) keep it above half

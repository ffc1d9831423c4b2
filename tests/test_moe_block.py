"""models.moe.SparseMoE: the talker's shared expert folded into the routed experts after loading (as
``shared_parts()`` more experts of the routed width, its gate as one more router row) computes what the
unfolded block computes — bf16/fp32 weights and block-FP8 ones, on the torch path and the Triton path — and
is left alone where it cannot fold exactly."""
from __future__ import annotations

import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.models.moe import SparseMoE

from _tolerances import assert_close


def _block(hidden, experts, top_k, inter, shared, fp8=False, seed=0):
    moe = SparseMoE(hidden, experts, top_k, inter, True, shared, fp8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                p.data = (torch.randn(p.shape, generator=g) * 2).to(torch.float8_e4m3fn)
            elif name.endswith("scale_inv"):
                p.data = torch.rand(p.shape, generator=g) * 0.01 + 0.005
            else:
                p.data = torch.randn(p.shape, generator=g) * 0.2
    return moe.eval()


@pytest.mark.parametrize("hidden,experts,top_k,inter,shared,fp8,parts", [
    (48, 6, 3, 24, 48, False, 2),      # the released ratio (768 = 2 x 384)
    (48, 6, 3, 24, 24, False, 1),
    (48, 6, 3, 16, 24, False, 0),      # 24 is not a multiple of 16: the shared expert runs on its own
    (64, 4, 2, 128, 256, True, 2),     # FP8 parts on whole 128-row/column blocks of the scale grids
    (64, 4, 2, 136, 136, True, 1),     # one part: the grids are the shared expert's own, partial edge blocks
    (64, 4, 2, 136, 272, True, 0),     # two parts would cut a 128-block of the grids: not folded
])
def test_folded_shared_expert_computes_the_block(hidden, experts, top_k, inter, shared, fp8, parts):
    moe = _block(hidden, experts, top_k, inter, shared, fp8)
    x = torch.randn(7, hidden)
    with torch.no_grad():
        want = moe(x)
        assert moe.shared_parts() == parts
        assert moe.fuse_shared_expert() == (parts > 0)
        assert not moe.fuse_shared_expert()            # once only
        got = moe(x)
    names = {n for n, _ in moe.named_parameters()}
    if parts:
        assert moe.num_shared == parts and not any(n.startswith("shared_expert") for n in names)
        assert moe.gate.weight.shape == (experts + 1, hidden)
        assert moe.experts.gate_up_proj.shape == (experts + parts, 2 * inter, hidden)
        assert moe.experts.down_proj.shape == (experts + parts, hidden, inter)
    else:
        assert moe.num_shared == 0 and any(n.startswith("shared_expert") for n in names)
    assert_close(got, want, name=f"folded shared expert, {parts} parts, fp8={fp8}")


@pytest.mark.parametrize("tokens", [1, 6])   # decode kernels (1 x 5 assignments < 8 experts), grouped GEMMs
def test_folded_shared_expert_on_the_triton_path(tokens):
    moe = _block(48, 6, 3, 24, 48)
    x = torch.randn(tokens, 48)
    with torch.no_grad():
        want = moe(x)
        moe.fuse_shared_expert()
        with force_triton():
            got = moe(x)
    assert_close(got, want, name=f"Triton path, {tokens} tokens")


def test_post_load_hook_folds_on_the_meta_device():
    """The loader and the census call ``materialize_buffers`` once the weights are in: the fold happens there,
    shapes only, on meta as on a device (the census counts the folded block)."""
    with torch.device("meta"):
        moe = SparseMoE(32, 8, 2, 16, True, 32)
    moe.materialize_buffers(torch.device("meta"))
    assert moe.num_shared == 2 and moe.experts.gate_up_proj.shape == (10, 32, 32)
    assert moe.experts.gate_up_proj.device.type == "meta"

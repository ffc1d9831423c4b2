"""The code predictor's frame attention: the workspace read as B pages through the paged decode kernel (one
launch per layer and step) against the plain masked attention, under the interpreter and on the torch path;
its precomputed metadata against the on-the-fly one; a bucket's narrowed workspace."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omni_rt.kernels import force_triton
from omni_rt.kernels.paged_attention import attention_ref
from omni_rt.models.code_predictor import CodePredictor, CodePredictorAttention, FrameWorkspace
from omni_rt.models.layers import Rotary, split


class _Cfg:
    num_attention_heads, num_key_value_heads, head_dim, hidden_size, rms_norm_eps = 4, 2, 16, 24, 1e-6


def _workspace(b, g=16):
    """``CodePredictor.workspace`` for b + 2 rows narrowed to b (a graph bucket's slice of a larger one)."""
    cfg = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=2, num_code_groups=g, head_dim=16)
    owner = SimpleNamespace(cfg=cfg, lm_head=[SimpleNamespace(weight=torch.zeros(1))],
                            model=SimpleNamespace(rotary=Rotary(16, 10000.0)))
    ws = CodePredictor.workspace(owner, b + 2, "cpu", torch.float32)
    ws.k.zero_(), ws.v.zero_()
    return ws.narrow(b)


@pytest.mark.parametrize("forced", [False, True], ids=["torch", "triton-interpreter"])
def test_frame_attention_steps_match_masked_attention(forced):
    torch.manual_seed(0)
    attn = CodePredictorAttention(_Cfg())
    b = 3
    ws = _workspace(b)
    cos, sin = torch.ones(16, 16), torch.zeros(16, 16)   # identity rotary: the test is about the attention
    xs = [torch.randn(b, 2, 24)] + [torch.randn(b, 1, 24) for _ in range(4)]
    starts = [0, 2, 3, 4, 5]
    outs = []
    with torch.inference_mode(), force_triton(forced):
        for x, s in zip(xs, starts):
            t = x.shape[1]
            outs.append(attn(x, cos[s:s + t], sin[s:s + t], ws.k[0], ws.v[0], s, None, ws.attention_meta(s, t)))
    # truth: per row, q/k/v of every position so far, causal softmax attention, o_proj
    with torch.inference_mode():
        x_all = torch.cat(xs, dim=1)                                            # (b, 6, hidden)
        for row in range(b):
            q, k, v = split(attn.qkv_proj(x_all[row]), attn.qkv_proj.parts)
            q, k, v = q.reshape(6, 4, 16), k.reshape(6, 2, 16), v.reshape(6, 2, 16)
            q, k = attn.q_norm(q), attn.k_norm(k)
            want = attn.o_proj(attention_ref(q, k, v, torch.arange(6), attn.scale).reshape(6, 64))
            got = torch.cat([o[row] for o in outs])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_precomputed_metadata_equals_the_computed_one():
    ws = _workspace(3)
    bare = FrameWorkspace(ws.k, ws.v)
    for start, t in [(0, 2), (0, 1), (7, 1), (15, 1), (3, 2)]:
        for a, b in zip(ws.attention_meta(start, t), bare.attention_meta(start, t)):
            assert torch.equal(a, b) and a.dtype == torch.int32
    assert bare.attention_meta(0, 3)[1].tolist() == [1, 2, 3] * 3

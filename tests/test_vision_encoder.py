"""The vision encoder equals transformers' visual tower (fp32, CPU), and Runtime.encode_image exposes it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_rt import vision
from _tolerances import PARITY


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    from omni_rt.models.omni import load_model

    return load_model(tiny_checkpoint, torch.float32, "cpu", with_talker=False)


def _compare(ours, hf_tiny, pv, grid):
    with torch.no_grad():
        out, taps = ours.thinker.visual(pv, grid)
        ref = hf_tiny.thinker.model.visual(pv, grid_thw=grid)
    assert out.shape == ref.pooler_output.shape
    assert _rel(out, ref.pooler_output) <= PARITY["vision_encoder_rel"]
    assert len(taps) == len(ref.deepstack_features) == 2
    for a, b in zip(taps, ref.deepstack_features):
        assert _rel(a, b) <= PARITY["vision_encoder_rel"]


def test_several_images_of_different_sizes_in_one_call(ours, hf_tiny):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((37, 53, 3), (70, 60, 3), (100, 170, 3), (20, 700, 3))]
    pv, grid = vision.preprocess_images(imgs)
    assert len({tuple(g) for g in grid.tolist()}) == 4
    _compare(ours, hf_tiny, pv, grid)


def test_video_and_odd_frame_count(ours, hf_tiny):
    rng = np.random.default_rng(1)
    pv, grid, _ = vision.preprocess_video(rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8), 2.0)
    assert grid[0, 0] == 3
    _compare(ours, hf_tiny, pv, grid)


def test_image_and_video_grids_together(ours, hf_tiny):
    rng = np.random.default_rng(2)
    pv_i, g_i = vision.preprocess_images([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    pv_v, g_v, _ = vision.preprocess_video(rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8), 1.0)
    _compare(ours, hf_tiny, torch.cat([pv_i, pv_v]), torch.cat([g_i, g_v]))


def test_attention_stays_within_each_frame(ours):
    """Changing one frame must not change another frame's output (bidirectional only inside a frame)."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pv, grid, _ = vision.preprocess_video(frames, 2.0)
    frames2 = frames.copy()
    frames2[2:] = 255 - frames2[2:]
    pv2, _, _ = vision.preprocess_video(frames2, 2.0)
    with torch.no_grad():
        a, _ = ours.thinker.visual(pv, grid)
        b, _ = ours.thinker.visual(pv2, grid)
    half = a.shape[0] // 2
    assert torch.equal(a[:half], b[:half])
    assert not torch.allclose(a[half:], b[half:])


def test_runtime_encode_image(tiny_checkpoint, hf_tiny):
    from omni_rt import Runtime

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    with Runtime(tiny_checkpoint, device="cpu") as rt:
        out = rt.encode_image(img)
        out2, taps = rt.encode_image(img, deepstack=True)
    pv, grid = vision.preprocess_images([img])
    with torch.no_grad():
        ref = hf_tiny.thinker.model.visual(pv, grid_thw=grid)
    assert out.shape == (grid.prod().item() // 4, 48)
    assert _rel(out, ref.pooler_output) <= PARITY["vision_encoder_rel"]
    assert torch.equal(out, out2) and len(taps) == 2
    assert _rel(taps[1], ref.deepstack_features[1]) <= PARITY["vision_encoder_rel"]


def test_wrong_pixel_shape_is_refused(ours):
    with pytest.raises(ValueError, match="pixel_values"):
        ours.thinker.visual(torch.zeros(10, 1536), torch.tensor([[1, 4, 4]]))


def test_triton_forced_block_window_attention_path(ours, hf_tiny):
    """The CUDA path (one block-window attention launch over every frame, max_seqlen from the grids) under the
    Triton interpreter: same output as the reference."""
    from omni_rt.kernels import force_triton

    rng = np.random.default_rng(5)
    pv_i, g_i = vision.preprocess_images([rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
                                          rng.integers(0, 256, (20, 300, 3), dtype=np.uint8)])
    with force_triton():
        _compare(ours, hf_tiny, pv_i, g_i)


def test_encode_in_frame_groups_equals_one_call(ours):
    rng = np.random.default_rng(6)
    pv_v, g_v, _ = vision.preprocess_video(rng.integers(0, 256, (6, 20, 30, 3), dtype=np.uint8), 2.0)
    pv_i, g_i = vision.preprocess_images([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    media = [(pv_i, tuple(g_i[0].tolist())), (pv_v, tuple(g_v[0].tolist()))]
    with torch.no_grad():
        whole, taps = ours.thinker.visual.encode(media, torch.float32)
        grouped, taps_g = ours.thinker.visual.encode(media, torch.float32, max_patches=int(g_v[0, 1] * g_v[0, 2]))
        direct, _ = ours.thinker.visual(torch.cat([pv_i, pv_v]), torch.cat([g_i, g_v]))
    for a, b in zip(whole, grouped):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat(whole), direct, rtol=1e-5, atol=1e-6)
    assert [t[0].shape for t in taps] == [t[0].shape for t in taps_g]

"""omni_rt.vision equals transformers' torchvision-backed Qwen2VLImageProcessor / Qwen2VLVideoProcessor.

The reference outputs were made once by scripts/make_vision_fixtures.py in a side environment with torchvision
(it cannot be installed beside this torch); they are stored as uint8 levels, pixel_values = (level - 127.5) / 127.5
exactly, so "≤ 1e-5" is checked as exact equality of the levels plus the float tolerance on pixel values.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
import torch

from omni_rt import vision
from _tolerances import PARITY

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vision", "processor_reference.npz")


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


def _pv(levels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(levels).float() - 127.5) / 127.5


def _check(pv: torch.Tensor, grid: torch.Tensor, levels: np.ndarray, ref_grid: np.ndarray, name: str):
    assert grid.tolist() == ref_grid.tolist(), f"{name}: grid {grid.tolist()} != {ref_grid.tolist()}"
    expected = _pv(levels)
    assert pv.shape == expected.shape, f"{name}: {tuple(pv.shape)} != {tuple(expected.shape)}"
    assert pv.dtype == torch.float32
    err = (pv - expected).abs().max().item()
    assert err <= PARITY["pixel_values_abs"], f"{name}: max |diff| {err}"


@pytest.mark.parametrize("name", ["odd", "tiny", "wide", "textured", "round_half", "gray", "rgba"])
def test_image_arrays_equal_reference(ref, name):
    pv, grid = vision.preprocess_images([ref[f"image/{name}/input"]])
    _check(pv, grid, ref[f"image/{name}/levels"], ref[f"image/{name}/grid"], name)


def test_gray_2d_array_equals_gray_hw1(ref):
    arr = ref["image/gray/input"]
    pv, grid = vision.preprocess_images([arr[:, :, 0]])
    _check(pv, grid, ref["image/gray/levels"], ref["image/gray/grid"], "gray 2-D")


@pytest.mark.parametrize("name", ["pil_L", "pil_RGBA", "pil_P", "pil_LA"])
def test_pil_modes_equal_reference(ref, name):
    from PIL import Image

    img = Image.open(io.BytesIO(ref[f"pil/{name}/png"].tobytes()))
    pv, grid = vision.preprocess_images([img])
    _check(pv, grid, ref[f"pil/{name}/levels"], ref[f"pil/{name}/grid"], name)


def test_png_path_equals_array(tmp_path, ref):
    from PIL import Image

    arr = ref["image/textured/input"]
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    pv, grid = vision.preprocess_images([str(path)])
    _check(pv, grid, ref["image/textured/levels"], ref["image/textured/grid"], "png path")


def test_several_images_in_one_call(ref):
    imgs = [ref["image/odd/input"], ref["image/tiny/input"], ref["image/wide/input"]]
    pv, grid = vision.preprocess_images(imgs)
    _check(pv, grid, ref["multi/levels"], ref["multi/grid"], "multi")


@pytest.mark.parametrize("name", ["odd5", "two"])
def test_video_arrays_equal_reference(ref, name):
    frames = ref[f"video/{name}/input"]
    pv, grid, spg = vision.preprocess_video(frames, fps=2.0)
    assert grid.tolist() == ref[f"video/{name}/grid"].tolist()
    assert spg == 1.0  # temporal_patch / fps
    lv = torch.round(pv * 127.5 + 127.5)
    assert torch.equal((lv - 127.5) / 127.5, pv), "pixel values are not exact levels"
    lv = lv.to(torch.uint8).numpy()
    assert list(lv.shape) == ref[f"video/{name}/shape"].tolist()
    np.testing.assert_array_equal(lv[:64], ref[f"video/{name}/head"])
    np.testing.assert_array_equal(lv[-64:], ref[f"video/{name}/tail"])
    assert hashlib.sha256(lv.tobytes()).digest() == ref[f"video/{name}/sha256"].tobytes()


def test_video_frame_groups_do_not_change_the_result(ref):
    frames = ref["video/odd5/input"]
    a = vision.preprocess_video(frames, 2.0)[0]
    b = vision.preprocess_video(frames, 2.0, frame_group=2)[0]
    assert torch.equal(a, b)


def test_fractional_fps_second_per_grid():
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    assert vision.preprocess_video(frames, 2.5)[2] == pytest.approx(0.8)


def test_smart_resize_quirks():
    assert vision.smart_resize(656, 100, 32)[0] == 640           # round half to even
    assert vision.smart_resize(5, 7, 32, 3136) == (64, 96)       # below min_pixels: ceil
    with pytest.raises(ValueError, match="aspect ratio"):
        vision.smart_resize(1, 201, 32)
    with pytest.raises(ValueError, match="aspect ratio"):
        vision.preprocess_images([np.zeros((2, 500, 3), dtype=np.uint8)])


@pytest.mark.parametrize("bad, match", [
    ("not an image", "file not found"),
    (np.zeros((0, 5, 3), dtype=np.uint8), "zero-size"),
    (np.zeros((5, 5, 3), dtype=np.float32), "uint8"),
    (np.zeros((5, 5, 2), dtype=np.uint8), "shape"),
    (12, "not an image"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), "numpy"),
])
def test_bad_images_are_refused(bad, match):
    # a missing path is a FileNotFoundError, as for audio (issue 12); the rest are ValueErrors
    with pytest.raises(FileNotFoundError if match == "file not found" else ValueError, match=match):
        vision.preprocess_images([bad])


def test_truncated_and_non_image_files(tmp_path):
    from PIL import Image

    good = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(good)
    data = good.read_bytes()
    trunc = tmp_path / "t.png"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "n.png"
    text.write_text("hello")
    for p in (trunc, text):
        with pytest.raises(ValueError, match="image 0"):
            vision.preprocess_images([str(p)])


def test_bad_videos_are_refused():
    with pytest.raises(ValueError, match="no frames"):
        vision.preprocess_video(np.zeros((0, 8, 8, 3), np.uint8), 2.0)
    with pytest.raises(ValueError, match="fps"):
        vision.preprocess_video(np.zeros((2, 8, 8, 3), np.uint8), 0.0)
    with pytest.raises(ValueError, match="uint8"):
        vision.preprocess_video(np.zeros((2, 8, 8), np.uint8), 2.0)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    rgb = vision.load_image(str(path))
    assert rgb.shape == (3, 64, 64) and rgb.dtype == torch.uint8
    # transformers' PIL conversion clips 16-bit values at 255 (an all-white picture); we scale by 255/65535.
    assert int(rgb.max()) < 255 or int(rgb.min()) < 255
    assert abs(int(rgb[0, -1, -1]) - round(int(arr[-1, -1]) * 255 / 65535)) <= 1


def test_preprocessor_config_is_read(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 100000, "max_pixels": 200000,
                                                                   "patch_size": 16, "merge_size": 2}))
    cfg = vision.VisionPreprocessConfig.from_checkpoint(tmp_path)
    assert cfg.min_pixels == 100000 and cfg.max_pixels == 200000
    assert vision.num_image_tokens(10, 10, cfg) == vision.image_size(10, 10, cfg)[0] * \
        vision.image_size(10, 10, cfg)[1] // 1024


# ---------------------------------------------------------------------------------------------- video files
FILES = os.path.join(os.path.dirname(__file__), "fixtures", "vision", "video_files.npz")


@pytest.fixture(scope="module")
def files():
    return np.load(FILES)


def _file_names():
    with np.load(FILES) as f:
        return sorted({k.split("/")[1] for k in f.files if k.startswith("file/")})


@pytest.mark.parametrize("name", _file_names())
def test_video_file_decode_equals_qwen_omni_utils(files, name, tmp_path):
    """A video file through load_video + preprocess_video equals the official pipeline: qwen-omni-utils'
    fetch_video (decord reader: decode, 2 fps sampling, its factor-28 resize; frames exact, sample fps) and then
    Qwen2VLVideoProcessor on its float frames (rows kept in the fixture ≤ 1e-5, every column's sum too)."""
    pytest.importorskip("av")
    key = f"file/{name}"
    path = tmp_path / f"{name}.{files[f'{key}/ext']}"
    path.write_bytes(files[f"{key}/bytes"].tobytes())
    frames, fps = vision.load_video(path)
    assert fps == pytest.approx(float(files[f"{key}/sample_fps"]), rel=1e-12)
    assert list(frames.shape) == files[f"{key}/frames_shape"].tolist()
    np.testing.assert_array_equal(frames[:, 0], files[f"{key}/frames_first_row"])
    assert hashlib.sha256(frames.tobytes()).digest() == files[f"{key}/frames_sha256"].tobytes()

    pv, grid, spg = vision.preprocess_video(frames, fps, float_resize=True)
    assert grid.tolist() == files[f"{key}/grid"].tolist()
    assert list(pv.shape) == files[f"{key}/pv_shape"].tolist()
    rows = torch.from_numpy(files[f"{key}/pv_rows_index"])
    err = (pv[rows] - torch.from_numpy(files[f"{key}/pv_rows"])).abs().max().item()
    assert err <= PARITY["pixel_values_abs"], f"{name}: max |diff| {err}"
    colsum = pv.double().sum(0).numpy()
    np.testing.assert_allclose(colsum, files[f"{key}/pv_colsum"], rtol=0, atol=pv.shape[0] * PARITY["pixel_values_abs"])
    assert spg == pytest.approx(2 / float(files[f"{key}/sample_fps"]))


def test_decoded_frames_are_resized_as_float_by_the_processor(files, tmp_path):
    """The uint8 kernel (for frames given as arrays) would be off by more than the tolerance on a decoded file:
    the flag is what makes file input equal the reference, not a no-op."""
    pytest.importorskip("av")
    key = "file/h264_7fps"
    path = tmp_path / "v.mp4"
    path.write_bytes(files[f"{key}/bytes"].tobytes())
    frames, fps = vision.load_video(path)
    pv = vision.preprocess_video(frames, fps)[0]
    rows = torch.from_numpy(files[f"{key}/pv_rows_index"])
    assert (pv[rows] - torch.from_numpy(files[f"{key}/pv_rows"])).abs().max().item() > PARITY["pixel_values_abs"]

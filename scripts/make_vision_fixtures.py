"""Build the vision fixtures in a side environment with torchvision:

* tests/fixtures/vision/processor_reference.npz — transformers' torchvision-backed image/video processors;
* tests/fixtures/vision/video_files.npz — video *files* through the official pipeline: qwen-omni-utils'
  ``fetch_video`` (decode, 2 fps sampling, its factor-28 resize) then ``Qwen2VLVideoProcessor`` at the sizes
  ``Qwen3OmniMoeProcessor`` passes, fed the float frames and the sample fps that fetch_video returns.

The reference image/video processors need torchvision, which cannot be installed beside the runtime's CPU torch,
so this runs once in a side environment and its output is committed:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 pillow
    /tmp/tv/bin/pip install av==18.1.0 qwen-omni-utils==0.0.9 decord==0.6.0      # video_files only
    /tmp/tv/bin/python scripts/make_vision_fixtures.py [images|video_files]      # default: both

qwen-omni-utils picks its reader at import: torchcodec, else decord, else ``torchvision.io.read_video``.
torchvision 0.29 no longer has ``read_video`` and torchcodec needs system FFmpeg libraries (absent here), so the
reference reader is decord (the one Qwen's READMEs recommend; its wheel bundles its own FFmpeg). The videos are
written with PyAV in codecs whose decoding is bit-exact across FFmpeg versions (H.264, FFV1, raw): MPEG-4 part 2,
for one, decodes differently in decord's FFmpeg and PyAV's.

Inputs are deterministic (numpy PCG64, stored in the file too). Outputs are stored as uint8 "levels" in the
processor's patch layout: pixel_values = (level - 127.5) / 127.5 exactly (asserted below), so the file stays
small and loses nothing. Settings: the released preprocessor_config.json (patch 16, temporal 2, merge 2,
min_pixels 3136, max_pixels 12845056, mean = std = 0.5) and the video sizes Qwen3OmniMoeProcessor passes.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "vision")
OUT = os.path.join(FIXTURES, "processor_reference.npz")
OUT_FILES = os.path.join(FIXTURES, "video_files.npz")
PRE = dict(min_pixels=3136, max_pixels=12845056, patch_size=16, temporal_patch_size=2, merge_size=2,
           image_mean=[0.5] * 3, image_std=[0.5] * 3)
VIDEO_SIZE = {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}


def smooth(rng, h, w, c=3, low=(7, 9)):
    """Textured but compressible: a low-resolution random image upsampled, plus a little noise."""
    small = rng.integers(0, 256, (low[0], low[1], c)).astype(np.float64)
    ys, xs = np.linspace(0, low[0] - 1, h), np.linspace(0, low[1] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, low[0] - 1), np.minimum(x0 + 1, low[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (small[y0][:, x0] * (1 - fy) * (1 - fx) + small[y1][:, x0] * fy * (1 - fx)
           + small[y0][:, x1] * (1 - fy) * fx + small[y1][:, x1] * fy * fx)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def levels(pv: torch.Tensor) -> np.ndarray:
    lv = torch.round(pv * 127.5 + 127.5)
    assert lv.min() >= 0 and lv.max() <= 255
    back = (lv.to(torch.uint8).float() - 127.5) / 127.5
    assert torch.equal(back, pv), "pixel_values are not (level - 127.5) / 127.5"
    return lv.to(torch.uint8).numpy()


def main():
    rng = np.random.default_rng(1234)
    ip = Qwen2VLImageProcessor(**PRE)
    # min_pixels/max_pixels would override size: the processor passes its video size at call time instead.
    vp = Qwen2VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3)
    assert ip.backend == "torchvision"
    out = {}
    images = {
        "odd": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),           # odd sizes, pure noise
        "tiny": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),            # below min_pixels: scaled up
        "wide": smooth(rng, 9, 1500),                                       # aspect 166
        "textured": smooth(rng, 200, 150, low=(40, 31)),                    # downscaled (antialias matters)
        "round_half": smooth(rng, 656, 40),                                  # 656/32 = 20.5 -> 640
        "gray": smooth(rng, 45, 61, c=1),                                    # (H, W, 1) array
        "rgba": np.concatenate([smooth(rng, 40, 50), rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)], 2),
    }
    pil_modes = {"pil_L": ("gray2d", "L"), "pil_RGBA": ("rgba", "RGBA"), "pil_P": ("textured", "P"),
                 "pil_LA": ("rgba", "LA")}
    for name, arr in images.items():
        res = ip(arr, return_tensors="pt")
        out[f"image/{name}/input"] = arr
        out[f"image/{name}/levels"] = levels(res["pixel_values"])
        out[f"image/{name}/grid"] = res["image_grid_thw"].numpy()
    images["gray2d"] = images["gray"][:, :, 0]  # (transformers refuses 2-D arrays; PIL "L" only)
    for name, (src, mode) in pil_modes.items():
        img = Image.fromarray(images[src])
        img = img.convert(mode) if mode != "P" else img.quantize(64)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        res = ip([Image.open(io.BytesIO(png.tobytes()))], return_tensors="pt")
        out[f"pil/{name}/png"] = png
        out[f"pil/{name}/levels"] = levels(res["pixel_values"])
        out[f"pil/{name}/grid"] = res["image_grid_thw"].numpy()
    # several images in one call, different sizes
    multi = [images["odd"], images["tiny"], images["wide"]]
    res = ip(multi, return_tensors="pt")
    out["multi/levels"] = levels(res["pixel_values"])
    out["multi/grid"] = res["image_grid_thw"].numpy()
    videos = {
        "odd5": np.stack([smooth(rng, 30, 44) for _ in range(5)]),          # odd length, scaled up (288x416)
        "two": np.stack([smooth(rng, 300, 900) for _ in range(2)]),       # scaled down
    }
    for name, frames in videos.items():
        res = vp([frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False,
                 size=VIDEO_SIZE)
        out[f"video/{name}/input"] = frames
        # The processor's video sizes scale every frame to >= 131072 pixels (~1 MB of levels per frame pair):
        # keep the digest of all levels plus the first and last rows for diagnostics.
        lv = levels(res["pixel_values_videos"])
        out[f"video/{name}/sha256"] = np.frombuffer(hashlib.sha256(lv.tobytes()).digest(), dtype=np.uint8)
        out[f"video/{name}/shape"] = np.array(lv.shape)
        out[f"video/{name}/head"] = lv[:64]
        out[f"video/{name}/tail"] = lv[-64:]
        out[f"video/{name}/grid"] = res["video_grid_thw"].numpy()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB) with torch {torch.__version__}", file=sys.stderr)


# (name, container, codec, pix_fmt, frames, height, width, fps): odd sizes, frame rates that 2 fps does not
# divide, a clip shorter than the 4-frame minimum, and a 720p clip the factor-28 resize scales down.
VIDEO_FILES = [
    ("h264_7fps", "mp4", "libx264", "yuv420p", 25, 240, 426, (7, 1)),          # 6 of 25 frames, 1.68 fps
    ("ffv1_odd_ntsc", "mkv", "ffv1", "bgr0", 13, 37, 53, (30000, 1001)),      # odd size, 29.97 fps -> 4 frames
    ("raw_3frames", "avi", "rawvideo", "bgr24", 3, 45, 61, (3, 1)),           # fewer frames than the minimum
    ("h264_720p", "mp4", "libx264", "yuv420p", 7, 720, 1280, (5, 1)),         # scaled down at factor 28
]
PV_ROWS = 48   # pixel_values rows kept per video (evenly spaced), plus every column's float64 sum over all rows


def blocky(rng, t, h, w, noise=3.0):
    """Frames of sharp-edged blocks plus noise: bicubic overshoot at every edge, so clamping and rounding show."""
    base = rng.integers(0, 256, (t, 5, 7, 3)).astype(np.float64)
    out = np.stack([np.kron(b, np.ones((h // 5 + 1, w // 7 + 1, 1)))[:h, :w] for b in base])
    return np.clip(np.round(out + rng.normal(0, noise, out.shape)), 0, 255).astype(np.uint8)


def write_video(path, frames, codec, pix_fmt, rate):
    import fractions

    import av

    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fractions.Fraction(*rate))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "libx264":
            s.options = {"crf": "28", "preset": "veryfast"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def video_files(tmp):
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    from qwen_omni_utils.v2_5 import vision_process

    rng = np.random.default_rng(4321)
    vp = Qwen2VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3)
    out = {}
    for name, ext, codec, pix_fmt, t, h, w, rate in VIDEO_FILES:
        path = os.path.join(tmp, f"{name}.{ext}")
        write_video(path, blocky(rng, t, h, w, noise=1.0 if h >= 720 else 3.0), codec, pix_fmt, rate)
        video, sample_fps = vision_process.fetch_video({"type": "video", "video": path},
                                                       return_video_sample_fps=True)
        assert vision_process.get_video_reader_backend() == "decord"
        frames = video.to(torch.uint8)
        assert torch.equal(frames.float(), video), "fetch_video's frames are not whole levels"
        frames = frames.permute(0, 2, 3, 1).contiguous().numpy()             # (T, H, W, 3) like load_video
        res = vp([video], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False, size=VIDEO_SIZE)
        pv = res["pixel_values_videos"]
        rows = np.linspace(0, pv.shape[0] - 1, PV_ROWS).round().astype(np.int64)
        key = f"file/{name}"
        with open(path, "rb") as f:
            out[f"{key}/bytes"] = np.frombuffer(f.read(), dtype=np.uint8)
        out[f"{key}/ext"] = np.array(ext)
        out[f"{key}/sample_fps"] = np.array(sample_fps, dtype=np.float64)
        out[f"{key}/frames_shape"] = np.array(frames.shape)
        out[f"{key}/frames_sha256"] = np.frombuffer(hashlib.sha256(frames.tobytes()).digest(), dtype=np.uint8)
        out[f"{key}/frames_first_row"] = frames[:, 0]
        out[f"{key}/grid"] = res["video_grid_thw"].numpy()
        out[f"{key}/pv_shape"] = np.array(pv.shape)
        out[f"{key}/pv_rows_index"] = rows
        out[f"{key}/pv_rows"] = pv[rows].numpy()
        out[f"{key}/pv_colsum"] = pv.double().sum(0).numpy()
        print(f"{name}: {t} frames {h}x{w} @ {rate} -> {frames.shape} at {sample_fps:.4f} fps, "
              f"grid {res['video_grid_thw'].tolist()}, {out[f'{key}/bytes'].size} bytes", file=sys.stderr)
    np.savez_compressed(OUT_FILES, **out)
    print(f"wrote {OUT_FILES} ({os.path.getsize(OUT_FILES) / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    import tempfile

    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("images", "all"):
        main()
    if what in ("video_files", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            video_files(tmp)

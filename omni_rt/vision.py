"""Image and video preprocessing, equal to transformers' ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``.

The reference is transformers' torchvision backend (the one every real deployment runs, and the only backend of
the video processor). For BICUBIC on CPU it resizes the **uint8** (C, H, W) tensor with torch's bicubic
antialias kernel, then rescales and normalises in float32 with the fused ``(x - 127.5) / 127.5``; torchvision's
resize is a thin wrapper over that plain torch op, so we call it directly (no torchvision dependency).

Layouts:

* ``pixel_values``: ``(sum of t·h·w, C·T·p·p)`` float32; rows ordered (t, h/2, w/2, 2, 2) so each 2×2 merge cell
  is contiguous; columns (C, T, p, p). An image is one frame duplicated in both temporal slots; a video whose
  frame count is odd is padded by repeating its last frame (after resizing, as the reference does).
* ``grid_thw``: ``(n, 3)`` int64 — (temporal, height, width) in patches. Tokens per medium = ``prod // merge²``.

Inputs: images from a path, a ``PIL.Image`` or a uint8 (H, W, 3) array (also (H, W), (H, W, 1) and (H, W, 4));
PIL modes other than RGB (L, LA, P, RGBA, I;16, CMYK …) are converted as transformers does (alpha composited on
white). Videos: a uint8 (T, H, W, 3) array of frames already sampled plus its fps, or a file decoded with PyAV
(optional: ``pip install av``) and sampled as qwen-omni-utils does. Pillow is optional too (paths and PIL
images need it; arrays do not).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "VisionPreprocessConfig",
    "smart_resize",
    "load_image",
    "preprocess_images",
    "preprocess_video",
    "load_video",
    "load_video_audio",
    "num_image_tokens",
    "MAX_ASPECT_RATIO",
]

MAX_ASPECT_RATIO = 200
# qwen-omni-utils' frame sampling for video files (fetch_video / smart_nframes).
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
_UTILS_FACTOR = 28                       # qwen-omni-utils' first resize (IMAGE_FACTOR)
_UTILS_VIDEO_MIN_PIXELS = 128 * 28 * 28
_UTILS_VIDEO_MAX_PIXELS = 768 * 28 * 28
_UTILS_VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


@dataclasses.dataclass(frozen=True)
class VisionPreprocessConfig:
    """Processor settings; the defaults are the released checkpoint's ``preprocessor_config.json`` and the
    video sizes ``Qwen3OmniMoeProcessor`` passes (shortest_edge 128·32·32, longest_edge 768·32·32)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 12845056
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                     "video_min_pixels", "video_max_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VisionPreprocessConfig.{name} must be a positive integer, got {v!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"VisionPreprocessConfig.{name} must have 3 values, got {v!r}")
        if any(s <= 0 for s in self.image_std) or not self.rescale_factor > 0:
            raise ValueError("image_std and rescale_factor must be > 0")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None, vision_config: Any = None
                        ) -> "VisionPreprocessConfig":
        """Read ``preprocessor_config.json`` (and ``video_preprocessor_config.json``) when present; otherwise the
        released values, with patch/merge sizes taken from the model's vision config (``VisionEncoderConfig``)
        if given."""
        kw: dict[str, Any] = {}
        if vision_config is not None:
            kw.update(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                      merge_size=vision_config.spatial_merge_size)
        pre = _read_json(path, "preprocessor_config.json")
        if pre:
            size = pre.get("size") or {}
            for key, src in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "merge_size")):
                if src in pre:
                    kw[key] = int(pre[src])
            kw["min_pixels"] = int(pre.get("min_pixels", size.get("shortest_edge", cls.min_pixels)))
            kw["max_pixels"] = int(pre.get("max_pixels", size.get("longest_edge", cls.max_pixels)))
            if "image_mean" in pre:
                kw["image_mean"] = tuple(float(x) for x in pre["image_mean"])
            if "image_std" in pre:
                kw["image_std"] = tuple(float(x) for x in pre["image_std"])
            if "rescale_factor" in pre:
                kw["rescale_factor"] = float(pre["rescale_factor"])
        # The processor overrides the video sizes with its own (processing_qwen3_omni_moe.py videos_kwargs),
        # whatever a video_preprocessor_config.json says; only the patch geometry comes from there.
        vid = _read_json(path, "video_preprocessor_config.json")
        if vid:
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if key in vid and int(vid[key]) != kw.get(key, getattr(cls, key)):
                    raise ValueError(f"video_preprocessor_config.json {key}={vid[key]} differs from the image "
                                     f"processor's; omni_rt uses one patch geometry for both")
        factor = kw.get("patch_size", cls.patch_size) * kw.get("merge_size", cls.merge_size)
        kw["video_min_pixels"] = 128 * factor * factor
        kw["video_max_pixels"] = 768 * factor * factor
        return cls(**kw)


def _read_json(path, name: str) -> dict | None:
    if path is None:
        return None
    p = os.path.join(os.fspath(path), name)
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


DEFAULT = VisionPreprocessConfig()


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 3136,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """transformers' ``smart_resize`` (image_processing_qwen2_vl.py): sides multiples of ``factor``, area within
    [min_pixels, max_pixels], aspect ratio kept. Python's round-half-to-even is the reference's (656/32 = 20.5
    → 640); images below min_pixels scale up with ceil. Aspect ratio > 200 is a ValueError, as there."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1×1, got {height}×{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width)} ({height}×{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ------------------------------------------------------------------------------------------------ loading
def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image files and PIL images need Pillow: pip install 'omni_rt[vision]' "
                          "(or pip install pillow); uint8 numpy arrays work without it") from e
    return Image


def _pil_to_rgb(img) -> np.ndarray:
    """transformers' convert_to_rgb for PIL images: alpha (or palette transparency) composited on white."""
    Image = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: PIL's own convert("RGB") clips instead of scaling; scale to 8 bits first so a
        # 16-bit PNG keeps its picture (transformers clips here and gets a white image: a reference quirk).
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    else:
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(image: Any, name: str = "image") -> torch.Tensor:
    """A path, PIL image or array → uint8 (3, H, W) RGB tensor. ``name`` labels errors ("image 2")."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: file not found: {path}")
        Image = _pil()
        try:
            with Image.open(path) as img:
                from PIL import ImageOps

                img.load()
                img = ImageOps.exif_transpose(img)  # the upright image, as transformers' loaders return
                arr = _pil_to_rgb(img)
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{name}: {path} is not a readable image ({e})") from e
    elif isinstance(image, np.ndarray):
        arr = _array_to_rgb(image, name)
    elif type(image).__module__.startswith("PIL.") and hasattr(image, "getbands"):
        try:
            image.load()
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{name}: the PIL image cannot be decoded ({e})") from e
        arr = _pil_to_rgb(image)
    elif isinstance(image, torch.Tensor):
        raise ValueError(f"{name}: pass images as a path, a PIL image or a uint8 (H, W, 3) numpy array, not a "
                         f"torch.Tensor")
    else:
        raise ValueError(f"{name}: not an image ({type(image).__name__}); expected a path, a PIL image or a "
                         f"uint8 (H, W, 3) numpy array")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: zero-size image {arr.shape[0]}×{arr.shape[1]}")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 (H, W[, 1|3|4]) → (H, W, 3), as transformers' torchvision backend converts arrays."""
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: image arrays must be uint8 (H, W, 3), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8, "
                         f"got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: zero-size image {arr.shape[0]}×{arr.shape[1]}")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        # torchvision: to float in [0, 1], composite on white, back to uint8 with to_dtype's scaling.
        x = torch.from_numpy(np.ascontiguousarray(arr)).float() / 255.0
        rgb = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        return rgb.mul(255.0 + 1.0 - 1e-3).to(torch.uint8).numpy()
    return arr


# --------------------------------------------------------------------------------------------- transforms
def _resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 → (N, 3, height, width) uint8: torch's CPU bicubic-antialias kernel on uint8, which is
    what torchvision's resize calls for BICUBIC on CPU tensors (float or GPU resizes differ by ±1 level)."""
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames.cpu(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def _resize_float(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) any dtype → (N, 3, height, width) float32: the bicubic-antialias kernel in float, unclamped and
    unrounded — what transformers' video processor does with the *float* frames qwen-omni-utils hands it."""
    frames = frames.to(torch.float32)
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames.cpu(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def _resize_float_rounded(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 → uint8: torchvision's v1 ``transforms.functional.resize`` on a uint8 tensor (float
    bicubic-antialias, clamped to [0, 255], rounded), the resize qwen-omni-utils' ``fetch_video`` applies. It
    differs from the uint8 kernel of ``_resize_uint8`` by up to ~17 levels on noisy frames (bicubic overshoot is
    clamped once here, between the two passes there)."""
    if frames.shape[-2:] == (height, width):
        return frames
    out = _resize_float(frames, height, width).clamp_(0, 255).round_()
    return out.to(torch.uint8)


def _normalize(frames: torch.Tensor, cfg: VisionPreprocessConfig) -> torch.Tensor:
    """uint8/float → float32 with transformers' fused rescale+normalise: (x - mean/r) / (std/r), r = rescale
    factor."""
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = frames.to(torch.float32)
    return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _patchify(frames: torch.Tensor, cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) float → ((t·h·w, C·tp·p·p), (t, h, w)); T padded to a multiple of tp with the last frame."""
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -frames.shape[0] % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    T, C, H, W = frames.shape
    gt, gh, gw = T // tp, H // p, W // p
    x = frames.view(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def _process_frames(frames: torch.Tensor, size: tuple[int, int], cfg: VisionPreprocessConfig,
                    float_resize: bool = False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    frames = (_resize_float if float_resize else _resize_uint8)(frames, *size)
    return _patchify(_normalize(frames, cfg), cfg)


def image_size(height: int, width: int, cfg: VisionPreprocessConfig = DEFAULT) -> tuple[int, int]:
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def num_image_tokens(height: int, width: int, cfg: VisionPreprocessConfig = DEFAULT) -> int:
    """<|image_pad|> count for an image of that size."""
    h, w = image_size(height, width, cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size) // (cfg.merge_size ** 2)


def preprocess_images(images: Sequence[Any], cfg: VisionPreprocessConfig | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images → (pixel_values (Σ h·w, 3·tp·p·p) float32, image_grid_thw (n, 3) int64), as
    ``Qwen2VLImageProcessor`` (torchvision backend) computes them."""
    cfg = cfg or DEFAULT
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    rows, grids = [], []
    for i, img in enumerate(images):
        frame = load_image(img, f"image {i}")
        size = image_size(frame.shape[1], frame.shape[2], cfg)
        patches, grid = _process_frames(frame[None], size, cfg)
        rows.append(patches)
        grids.append(grid)
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def _video_array(frames: Any, name: str) -> torch.Tensor:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name}: a video must be a path or a uint8 (T, H, W, 3) numpy array, got "
                         f"{type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"{name}: video arrays must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name}: the video has no frames")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"{name}: zero-size frames {frames.shape[1]}×{frames.shape[2]}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


def video_size(height: int, width: int, cfg: VisionPreprocessConfig = DEFAULT) -> tuple[int, int]:
    return smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)


def preprocess_video(frames: np.ndarray, fps: float, cfg: VisionPreprocessConfig | None = None,
                     name: str = "video", frame_group: int = 64, float_resize: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Frames already sampled, uint8 (T, H, W, 3), at ``fps`` → (pixel_values_videos (t·h·w, 3·tp·p·p),
    video_grid_thw (1, 3), second_per_grid = temporal_patch / fps), as ``Qwen2VLVideoProcessor`` with the
    sizes ``Qwen3OmniMoeProcessor`` passes. Frames are resized in groups of ``frame_group`` (bounded memory).

    float_resize: True for frames that ``load_video`` decoded from a file. The official pipeline hands the
    processor qwen-omni-utils' frames as a *float* tensor, and the processor resizes float frames in float
    (unclamped, unrounded: up to ~1.3 levels from the uint8 kernel it applies to uint8 arrays)."""
    cfg = cfg or DEFAULT
    if not (isinstance(fps, (int, float, np.floating, np.integer)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"{name}: fps must be a finite number > 0, got {fps!r}")
    x = _video_array(frames, name)
    size = video_size(x.shape[2], x.shape[3], cfg)
    tp = cfg.temporal_patch_size
    group = max(tp, frame_group - frame_group % tp)
    rows, gt = [], 0
    for s in range(0, x.shape[0], group):
        patches, (t, gh, gw) = _process_frames(x[s: s + group], size, cfg, float_resize)
        rows.append(patches)
        gt += t
    grid = torch.tensor([[gt, gh, gw]], dtype=torch.long)
    return torch.cat(rows), grid, tp / float(fps)


# ------------------------------------------------------------------------------------------- video files
def _av(name: str):
    try:
        import av
    except ImportError as e:
        raise ImportError(f"{name}: decoding video files needs PyAV: pip install 'omni_rt[video]' (or pip install "
                          f"av); or pass the frames as a uint8 (T, H, W, 3) array with its fps") from e
    return av


def load_video(path: str | os.PathLike, name: str = "video") -> tuple[np.ndarray, float]:
    """Decode a video file with PyAV and sample it as qwen-omni-utils does: 2 fps, 4..768 frames, an even count,
    indices ``linspace(0, n - 1, k).round()``, then its first resize (factor 28, per-frame pixels bounded by the
    video's total budget) as torchvision's v1 resize does it on a uint8 tensor (float kernel, clamped, rounded).
    Returns (uint8 (T, H, W, 3) frames, the sampled fps); hand them to ``preprocess_video(..., float_resize=True)``
    (qwen-omni-utils returns them as float, so the processor's resize of them is a float one).

    Equal to qwen-omni-utils 0.0.9's ``fetch_video`` with its decord reader (frames, sample fps) on h264, FFV1 and
    raw video (tests/fixtures/vision/video_files.npz); lossy codecs whose decoders are not bit-exact across FFmpeg
    versions (MPEG-4 part 2) can differ in the decoded pixels themselves."""
    av = _av(name)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: {path} has no video stream")
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else 0.0
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise ValueError(f"{name}: {path} is not a readable video ({e})") from e
    if not frames:
        raise ValueError(f"{name}: {path} has no frames")
    if not video_fps > 0:
        raise ValueError(f"{name}: {path} has no frame rate")
    total = len(frames)
    nframes = _smart_nframes(total, video_fps, name)
    idx = torch.linspace(0, total - 1, nframes).round().long().tolist()
    clip = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
    sample_fps = nframes / max(total, 1e-6) * video_fps
    h, w = clip.shape[2], clip.shape[3]
    max_pixels = max(min(_UTILS_VIDEO_MAX_PIXELS, _UTILS_VIDEO_TOTAL_PIXELS / nframes * 2),
                     int(_UTILS_VIDEO_MIN_PIXELS * 1.05))
    rh, rw = smart_resize(h, w, _UTILS_FACTOR, _UTILS_VIDEO_MIN_PIXELS, max_pixels)  # float, as there
    clip = _resize_float_rounded(clip, rh, rw)
    return clip.permute(0, 2, 3, 1).contiguous().numpy(), sample_fps


def _smart_nframes(total: int, video_fps: float, name: str) -> int:
    def floor2(x):
        return math.floor(x / 2) * 2

    min_frames = math.ceil(VIDEO_MIN_FRAMES / 2) * 2
    max_frames = floor2(min(VIDEO_MAX_FRAMES, total))
    n = total / video_fps * VIDEO_FPS
    n = floor2(min(min(max(n, min_frames), max_frames), total))
    if not 2 <= n <= total:
        raise ValueError(f"{name}: a video needs at least 2 frames to sample, this one has {total}")
    return int(n)


def load_video_audio(path: str | os.PathLike, name: str = "video") -> np.ndarray:
    """The video file's own audio track as float32 mono 16 kHz (for use_audio_in_video)."""
    av = _av(name)
    from . import audio as audio_mod

    path = os.fspath(path)
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError(f"{name}: use_audio_in_video=True but {path} has no audio track")
            stream = container.streams.audio[0]
            chunks, rate = [], stream.rate
            for frame in container.decode(stream):
                a = frame.to_ndarray().astype(np.float32)
                if frame.format.is_planar:
                    a = a.mean(axis=0)
                else:
                    a = a.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                if np.issubdtype(frame.to_ndarray().dtype, np.integer):
                    a = a / float(np.iinfo(frame.to_ndarray().dtype).max + 1)
                chunks.append(a)
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise ValueError(f"{name}: cannot read the audio of {path} ({e})") from e
    if not chunks:
        raise ValueError(f"{name}: use_audio_in_video=True but the audio track of {path} is empty")
    wav = np.concatenate(chunks)
    return audio_mod.load(wav, sr=int(rate)) if rate != audio_mod.SAMPLE_RATE else wav.astype(np.float32)

"""Request preparation on the caller's thread: chat messages or a Prompt → token ids, audios and vision inputs.

Everything host-side and per request happens here (file decoding, resampling, image resizing, patchify, pad
expansion), so a bad input fails its own call with a ValueError naming the item and the engine thread only runs
encoders and decoders. Pad expansion is Qwen3OmniMoeProcessor's: ``<|audio_pad|>`` × audio tokens,
``<|image_pad|>`` / ``<|video_pad|>`` × grid_t·grid_h·grid_w/4, and with ``use_audio_in_video`` the video's
placeholder becomes ``<|audio_start|>`` + video and audio pads interleaved by time + ``<|audio_end|>``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import torch

from . import audio as audio_mod
from . import vision as vision_mod
from .config import OmniConfig
from .models.mrope import VisionItem, expand_vision_pads
from .request import Prompt, check_media


@dataclasses.dataclass
class VisionInput:
    """One preprocessed image or video: the prompt-side item and its patches (CPU float32)."""

    item: VisionItem
    pixel_values: torch.Tensor     # (t·h·w, 3·tp·p·p)


@dataclasses.dataclass
class PreparedPrompt:
    ids: list[int]
    audios: list[np.ndarray]
    vision: list[VisionInput]      # images and videos in order of appearance
    use_audio_in_video: bool = False


def load_audio(a: Any, name: str = "audio") -> np.ndarray:
    """One audio item (array/tensor at 16 kHz, or a path) as float32 16 kHz; TypeError for anything else,
    FileNotFoundError for a missing path, ValueError for audio the encoder cannot take."""
    check_media(name, a)
    wav = audio_mod.load(a) if isinstance(a, (str, os.PathLike)) else audio_mod.load(a, sr=audio_mod.SAMPLE_RATE)
    if wav.size < audio_mod.MIN_LOG_MEL_SAMPLES:
        raise ValueError(f"{name} has {wav.size} samples at 16 kHz; at least MIN_LOG_MEL_SAMPLES = "
                         f"{audio_mod.MIN_LOG_MEL_SAMPLES} (about 12.6 ms) are needed")
    return wav


def audio_tokens(wav: np.ndarray, n_window: int = 50) -> int:
    return int(audio_mod.num_audio_tokens(audio_mod.num_frames(wav.size), n_window))


class PromptBuilder:
    """Turns messages / Prompts into PreparedPrompts for one checkpoint."""

    def __init__(self, cfg: OmniConfig, tokenizer, preprocess: vision_mod.VisionPreprocessConfig | None):
        self.cfg, self.tokenizer, self.preprocess = cfg, tokenizer, preprocess
        self.merge = cfg.thinker.vision.spatial_merge_size if cfg.thinker.vision is not None else 2

    def _require_vision(self, label: str) -> vision_mod.VisionPreprocessConfig:
        refusal = self.cfg.vision_refusal()
        if refusal is not None or self.preprocess is None:
            raise ValueError(f"{label}: {refusal or 'this checkpoint has no vision tower'}")
        return self.preprocess

    def image(self, img: Any, label: str) -> VisionInput:
        pre = self._require_vision(label)
        try:
            pv, grid = vision_mod.preprocess_images([img], pre)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(str(e).replace("image 0", label)) from e
        return VisionInput(VisionItem("image", tuple(grid[0].tolist())), pv)

    def video(self, frames: Any, fps: float | None, label: str, audio_tokens_: int | None = None,
              decoded: bool = False) -> VisionInput:
        """decoded: frames from ``load_video`` (a file), which the official pipeline resizes in float."""
        pre = self._require_vision(label)
        pv, grid, spg = vision_mod.preprocess_video(frames, 2.0 if fps is None else fps, pre, name=label,
                                                    float_resize=decoded)
        return VisionInput(VisionItem("video", tuple(grid[0].tolist()), spg, audio_tokens_), pv)

    # ---------------------------------------------------------------------------------------- Prompt
    def from_prompt(self, prompt: Prompt, use_audio_in_video: bool | None) -> PreparedPrompt:
        aiv = prompt.use_audio_in_video if use_audio_in_video is None else bool(use_audio_in_video)
        if use_audio_in_video is not None and bool(use_audio_in_video) != prompt.use_audio_in_video:
            raise ValueError(f"use_audio_in_video={use_audio_in_video} disagrees with the Prompt's own "
                             f"use_audio_in_video={prompt.use_audio_in_video}")
        ids = list(prompt.token_ids)
        prompt.__post_init__()  # fields may have been assigned since construction
        audios = [load_audio(a, f"Prompt.audios[{i}]") for i, a in enumerate(prompt.audios)]
        counts = [audio_tokens(a, self.cfg.thinker.audio.n_window) for a in audios]
        th = self.cfg.thinker
        vision: list[VisionInput] = []
        n_img = n_vid = n_aud = 0
        for i, t in enumerate(ids):
            if t == th.audio_start_token_id:
                n_aud += 1
            if t != th.vision_start_token_id:
                continue
            nxt = ids[i + 1] if i + 1 < len(ids) else None
            if nxt == th.image_token_id:
                if n_img >= len(prompt.images):
                    raise ValueError(f"the prompt has more image blocks than images ({len(prompt.images)})")
                vision.append(self.image(prompt.images[n_img], f"image {n_img}"))
                n_img += 1
            elif nxt == th.video_token_id or (nxt == th.audio_start_token_id and aiv):
                if n_vid >= len(prompt.videos):
                    raise ValueError(f"the prompt has more video blocks than videos ({len(prompt.videos)})")
                label = f"video {n_vid}"
                track = None
                if nxt == th.audio_start_token_id:
                    if n_aud >= len(counts):
                        raise ValueError(f"{label}: use_audio_in_video block but Prompt.audios has no audio "
                                         f"at its place (audio {n_aud})")
                    track = counts[n_aud]
                elif aiv:
                    raise ValueError(f"{label}: use_audio_in_video=True but its block has no <|audio_start|>: "
                                     f"interleave its audio pads as Qwen3OmniMoeProcessor does")
                vision.append(self.video(prompt.videos[n_vid], prompt.video_fps[n_vid], label, track))
                n_vid += 1
            else:
                raise ValueError(f"token {i} is <|vision_start|> but is not followed by <|image_pad|> or "
                                 f"<|video_pad|>" + (" or <|audio_start|>" if aiv else ""))
        if n_img != len(prompt.images):
            raise ValueError(f"the prompt has {n_img} image blocks for {len(prompt.images)} images")
        if n_vid != len(prompt.videos):
            raise ValueError(f"the prompt has {n_vid} video blocks for {len(prompt.videos)} videos")
        return PreparedPrompt(ids, audios, vision, aiv)

    # -------------------------------------------------------------------------------------- messages
    def from_messages(self, messages: Any, use_audio_in_video: bool | None) -> PreparedPrompt:
        from .tokenizer import split_media

        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files (tokenizer.json, or vocab.json + "
                             "merges.txt): pass an omni_rt.Prompt with token ids instead of chat messages")
        aiv = bool(use_audio_in_video)
        messages, media = split_media(messages)
        audios: list[np.ndarray] = []
        vision: list[VisionInput] = []
        replacements: list[tuple[int, list[int]]] = []   # (placeholder id, its expansion) in order
        th = self.cfg.thinker
        n_img = n_vid = 0
        for kind, part in media:
            if kind == "audio":
                wav = load_audio(part["audio"], f"audio {len(audios)} of the messages")
                audios.append(wav)
                n = audio_tokens(wav, self.cfg.thinker.audio.n_window)
                replacements.append((th.audio_token_id, [th.audio_token_id] * n))
            elif kind == "image":
                v = self.image(part["image"], f"image {n_img}")
                n_img += 1
                vision.append(v)
                replacements.append((th.image_token_id, expand_vision_pads(v.item, th, self.merge)))
            else:
                label = f"video {n_vid}"
                n_vid += 1
                src, fps = part["video"], part.get("fps")
                if isinstance(src, (str, os.PathLike)):
                    self._require_vision(label)
                    frames, fps = vision_mod.load_video(src, label)
                else:
                    frames = src
                track = None
                if aiv:
                    if not isinstance(src, (str, os.PathLike)):
                        raise ValueError(f"{label}: use_audio_in_video=True needs a video file with an audio "
                                         f"track; frames given as an array have none")
                    wav = vision_mod.load_video_audio(src, label)
                    audios.append(wav)
                    track = audio_tokens(wav, self.cfg.thinker.audio.n_window)
                v = self.video(frames, fps, label, track, decoded=isinstance(src, (str, os.PathLike)))
                vision.append(v)
                replacements.append((th.video_token_id, expand_vision_pads(v.item, th, self.merge)))
        ids = self.tokenizer.encode(self.tokenizer.render(messages))
        return PreparedPrompt(expand_placeholders(ids, th, replacements), audios, vision, aiv)


def expand_placeholders(ids: Sequence[int], th, replacements: list[tuple[int, list[int]]]) -> list[int]:
    """Replace the k-th single <|audio_pad|> / <|image_pad|> / <|video_pad|> the chat template wrote by
    replacements[k] (the processor's expansion)."""
    pads = (th.audio_token_id, th.image_token_id, th.video_token_id)
    positions = [i for i, t in enumerate(ids) if t in pads]
    if len(positions) != len(replacements):
        raise ValueError(f"the chat template produced {len(positions)} media placeholders for "
                         f"{len(replacements)} media items")
    out: list[int] = []
    last = 0
    for k, (pos, (kind, rep)) in enumerate(zip(positions, replacements)):
        if ids[pos] != kind:
            raise ValueError(f"media item {k}: the chat template put a different placeholder there")
        out.extend(ids[last:pos])
        out.extend(rep)
        last = pos + 1
    out.extend(ids[last:])
    return out

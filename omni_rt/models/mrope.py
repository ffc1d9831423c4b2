"""TM-RoPE positions of a multimodal thinker prompt, and the layout check of its placeholder runs.

What transformers' ``get_rope_index`` computes (modeling_qwen3_omni_moe.py ≈ 219-460), as float32 (3, T):

* text: the same index on t, h, w, counting on from the previous block's last max + 1;
* ``AS <audio_pad>×n AE``: one position per token on all three axes;
* ``VS <image_pad>×(h·w/4) VE``: (st, st + row, st + col), t constant;
* ``VS <video_pad>×(t·h·w/4) VE``: t = frame_index · second_per_grid · position_id_per_seconds — fractional when
  the fps does not divide evenly (2.5 fps → 0, 10.4, 20.8 …), and so is every later position;
* audio-in-video ``VS AS [V…A…]… AE VE``: video and audio positions both start at st and are interleaved by time
  (a video token first when its t ≤ the audio index). The position after the block is the *last appended
  chunk's* max + 1, not the block's max (a reference quirk, ≈ line 441), kept so ids stay identical.

The rope delta (max + 1 − T) continues decode positions: position of token k ≥ T is k + delta (float32).

The reference regenerates the audio-in-video order from its rule and ignores the ids' actual order, so a hand-built
layout breaking the rule runs silently wrong there; here it is a ``ValueError`` naming the item.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..config import ThinkerConfig


@dataclasses.dataclass(frozen=True)
class VisionItem:
    """One image or video as the prompt sees it: grid (t, h, w) in patches, seconds per temporal grid (videos),
    and for audio-in-video the token count of its audio track."""

    kind: str                      # "image" | "video"
    grid: tuple[int, int, int]
    second_per_grid: float = 1.0
    audio_tokens: int | None = None  # audio-in-video: the track's token count

    def tokens(self, merge: int) -> int:
        t, h, w = self.grid
        return t * h * w // (merge * merge)


def interleave_audio_in_video(item: VisionItem, merge: int, position_id_per_seconds: float) -> list[bool]:
    """The processor's order for one audio-in-video block (processing_qwen3_omni_moe.py
    ``replace_video_with_audio_token``): True = a video token, False = an audio token."""
    t, h, w = item.grid
    per_frame = (h // merge) * (w // merge)
    # float64 like the processor's numpy arithmetic
    video_t = [ti * item.second_per_grid * position_id_per_seconds for ti in range(t) for _ in range(per_frame)]
    n_audio = item.audio_tokens or 0
    out, vi, ai = [], 0, 0
    while vi < len(video_t) and ai < n_audio:
        if video_t[vi] <= ai:
            out.append(True)
            vi += 1
        else:
            out.append(False)
            ai += 1
    out.extend([True] * (len(video_t) - vi))
    out.extend([False] * (n_audio - ai))
    return out


def expand_vision_pads(item: VisionItem, cfg: ThinkerConfig, merge: int) -> list[int]:
    """The ids replacing one ``<|image_pad|>`` / ``<|video_pad|>`` placeholder (between VS and VE)."""
    if item.kind == "image":
        return [cfg.image_token_id] * item.tokens(merge)
    if item.audio_tokens is None:
        return [cfg.video_token_id] * item.tokens(merge)
    order = interleave_audio_in_video(item, merge, cfg.position_id_per_seconds)
    return ([cfg.audio_start_token_id] + [cfg.video_token_id if v else cfg.audio_token_id for v in order]
            + [cfg.audio_end_token_id])


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def _grid_positions(start: torch.Tensor, t_index: torch.Tensor, h: int, w: int, merge: int) -> torch.Tensor:
    """(3, t·h/m·w/m) positions of a vision block: the reference's get_llm_pos_ids_for_vision."""
    gh, gw = h // merge, w // merge
    h_index = torch.arange(gh).view(1, -1, 1).expand(len(t_index), -1, gw).flatten().float()
    w_index = torch.arange(gw).view(1, 1, -1).expand(len(t_index), gh, -1).flatten().float()
    t_idx = t_index.view(-1, 1).expand(-1, gh * gw).flatten().float()
    return torch.stack([t_idx, h_index, w_index]) + start


def _t_index(item: VisionItem, pps: int) -> torch.Tensor:
    gt = item.grid[0]
    if item.kind == "image":
        return (torch.arange(gt) * 1 * pps).float()
    return (torch.arange(gt) * _f32(item.second_per_grid) * pps).float()


def multimodal_positions(ids: Sequence[int], cfg: ThinkerConfig, merge: int, audio_tokens: Sequence[int],
                         vision: Sequence[VisionItem]) -> tuple[torch.Tensor, float]:
    """Validate the prompt's placeholder layout and return (positions float32 (3, T), rope delta).

    ``audio_tokens``: token count of every audio in order of appearance (audio-in-video tracks included, at
    their video's place); ``vision``: images and videos in order of appearance. Raises ValueError naming the item
    whose pad run does not match its medium.
    """
    ids = list(ids)
    n = len(ids)
    vs, ve = cfg.vision_start_token_id, cfg.vision_end_token_id
    as_, ae = cfg.audio_start_token_id, cfg.audio_end_token_id
    img, vid, aud = cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id
    pps = cfg.position_id_per_seconds
    chunks: list[torch.Tensor] = []
    pos, ai, vi = 0, 0, 0
    counters = {"image": 0, "video": 0}

    def next_start() -> torch.Tensor:
        return chunks[-1].max() + 1 if chunks else _f32(0)

    def run(at: int, token: int) -> int:
        end = at
        while end < n and ids[end] == token:
            end += 1
        return end - at

    def text_until(end: int) -> None:
        nonlocal pos
        if end > pos:
            chunks.append(torch.arange(end - pos).view(1, -1).expand(3, -1) + next_start())
            pos = end

    while pos < n:
        # next block start: AS (audio) or VS (vision)
        nxt = pos
        while nxt < n and ids[nxt] not in (as_, vs):
            if ids[nxt] in (aud, img, vid):
                raise ValueError(f"token {nxt} is a multimodal pad outside an <|audio_start|>…<|audio_end|> or "
                                 f"<|vision_start|>…<|vision_end|> block")
            nxt += 1
        text_until(nxt)
        if pos >= n:
            break
        if ids[pos] == as_:
            label = f"audio {ai}"
            if ai >= len(audio_tokens):
                raise ValueError(f"the prompt has more audio blocks than audios ({len(audio_tokens)})")
            count = run(pos + 1, aud)
            if count != audio_tokens[ai] or pos + 1 + count >= n or ids[pos + 1 + count] != ae:
                raise ValueError(f"{label}: expected <|audio_start|> + {audio_tokens[ai]} <|audio_pad|> + "
                                 f"<|audio_end|>, the prompt has {count} pads there")
            start = next_start()
            chunks.append(torch.arange(1).view(1, -1).expand(3, -1) + start)
            start = start + 1
            chunks.append(torch.arange(count).view(1, -1).expand(3, -1) + start)
            chunks.append(torch.arange(1).view(1, -1).expand(3, -1) + next_start())
            pos += count + 2
            ai += 1
            continue
        # vision block
        if vi >= len(vision):
            raise ValueError(f"the prompt has more <|vision_start|> blocks than images and videos ({len(vision)})")
        item = vision[vi]
        label = f"{item.kind} {counters[item.kind]}"
        body = pos + 1
        if item.kind == "image" or item.audio_tokens is None:
            pad = img if item.kind == "image" else vid
            count = run(body, pad)
            want = item.tokens(merge)
            if count != want or body + count >= n or ids[body + count] != ve:
                pad_name = "<|image_pad|>" if pad == img else "<|video_pad|>"
                raise ValueError(f"{label}: expected <|vision_start|> + {want} {pad_name} + <|vision_end|> "
                                 f"(grid {item.grid}), the prompt has {count} there")
            start = next_start()
            chunks.append(torch.arange(1).view(1, -1).expand(3, -1) + start)
            start = start + 1
            t, h, w = item.grid
            chunks.append(_grid_positions(start, _t_index(item, pps), h, w, merge))
            chunks.append(torch.arange(1).view(1, -1).expand(3, -1) + next_start())
            pos = body + count + 1
        else:
            order = interleave_audio_in_video(item, merge, pps)
            if ai >= len(audio_tokens) or audio_tokens[ai] != item.audio_tokens:
                raise ValueError(f"{label}: its audio track is not the next audio in order of appearance")
            end = body + 1 + len(order)
            got = ids[body + 1: end]
            want = [vid if v else aud for v in order]
            if (ids[body] != as_ or got != want or end + 1 >= n or ids[end] != ae or ids[end + 1] != ve):
                raise ValueError(
                    f"{label} (use_audio_in_video): expected <|vision_start|><|audio_start|> + "
                    f"{item.tokens(merge)} <|video_pad|> and {item.audio_tokens} <|audio_pad|> interleaved by "
                    f"time as Qwen3OmniMoeProcessor does + <|audio_end|><|vision_end|>; the prompt's block differs "
                    f"(transformers would silently reorder it)")
            start = next_start()
            chunks.append(torch.arange(2).view(1, -1).expand(3, -1) + start)
            start = start + 2
            audio_pos = torch.arange(item.audio_tokens).view(1, -1).expand(3, -1) + start
            t, h, w = item.grid
            video_pos = _grid_positions(start, _t_index(item, pps), h, w, merge)
            chunks.extend(_merge_by_time(video_pos, audio_pos))
            chunks.append(torch.arange(2).view(1, -1).expand(3, -1) + next_start())
            pos = end + 2
            ai += 1
        vi += 1
        counters[item.kind] += 1
    if vi != len(vision):
        raise ValueError(f"the prompt has {vi} <|vision_start|> blocks for {len(vision)} images and videos")
    if ai != len(audio_tokens):
        raise ValueError(f"the prompt has {ai} audio blocks for {len(audio_tokens)} audios")
    positions = torch.cat([c.float() for c in chunks], dim=1).reshape(3, -1)
    delta = (positions.max() + 1 - n).item()
    return positions, delta


def _merge_by_time(video_pos: torch.Tensor, audio_pos: torch.Tensor) -> list[torch.Tensor]:
    """The reference's merge of an audio-in-video block, chunk for chunk: one-token chunks while both kinds
    remain (comparing the float32 t positions, video first on ties), then the remainder as one chunk. Its
    last chunk decides where the text after the block starts (the quirk above), so the chunks are kept."""
    vt, at = video_pos[0].tolist(), audio_pos[0].tolist()
    out, vi, ai = [], 0, 0
    while vi < len(vt) and ai < len(at):
        if vt[vi] <= at[ai]:
            out.append(video_pos[:, vi: vi + 1])
            vi += 1
        else:
            out.append(audio_pos[:, ai: ai + 1])
            ai += 1
    if vi < len(vt):
        out.append(video_pos[:, vi:])
    if ai < len(at):
        out.append(audio_pos[:, ai:])
    return out


def decode_positions(context_len: Sequence[int], deltas: Sequence[float], device) -> torch.Tensor:
    """(3, B) float32 positions of decode tokens at index context_len - 1... i.e. token k gets k + delta (the
    reference adds the float32 rope delta to the integer cache length)."""
    k = torch.tensor(list(context_len), dtype=torch.float32)
    d = torch.tensor(list(deltas), dtype=torch.float32)
    return (k + d).to(device).expand(3, -1)

"""The Talker: a Qwen3 MoE decoder (every layer MoE + sigmoid-gated shared expert, interleaved M-RoPE) that
reads projected thinker states and emits codec code 0 of each frame; the code predictor adds codes 1..G-1.

Reference: transformers ``Qwen3OmniMoeTalkerForConditionalGeneration`` / ``Qwen3OmniMoeTalkerModel``.
Parameter names (under ``talker.``): ``model.layers.N.*``, ``model.norm``, ``model.codec_embedding``,
``codec_head``, ``{text,hidden}_projection.linear_fc{1,2}``, ``code_predictor.*``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TalkerConfig
from .code_predictor import CodePredictor
from .layers import AttentionMetadata, text_positions, to_device
from .mrope import multimodal_positions
from .thinker import Decoder


class ResizeMLP(nn.Module):
    """Linear → SiLU → Linear with biases: thinker width → talker width (reference TalkerResizeMLP)."""

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_dim, mid_dim, bias=True)
        self.linear_fc2 = nn.Linear(mid_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., thinker_hidden) → (..., talker_hidden)."""
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerDecoder(Decoder):
    """The thinker's Decoder with shared experts and no token embedding, plus the codec embedding table."""

    def __init__(self, cfg, fp8: bool = False):
        super().__init__(cfg, shared_expert=True, embed=False, fp8=fp8)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig, thinker_hidden: int, fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.text
        self.model = TalkerDecoder(d, fp8)
        self.codec_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        # the reference sizes fc1 by text_config.intermediate_size (equal to the thinker width when released)
        self.text_projection = ResizeMLP(thinker_hidden, d.intermediate_size, d.hidden_size)
        self.hidden_projection = ResizeMLP(thinker_hidden, d.intermediate_size, d.hidden_size)
        self.code_predictor = CodePredictor(cfg.code_predictor)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                tap_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embeds: (tokens, H); positions: (3, tokens) → (post-norm hidden (tokens, H), tap or None)."""
        return self.model(embeds, positions, kv_caches, meta, tap_layer)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (n, H) post-norm → codec logits (n, vocab)."""
        return self.codec_head(hidden)

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) codec ids → (..., H) talker codec embeddings."""
        return self.model.codec_embedding(ids)

    def suppress_mask(self, device) -> torch.Tensor:
        """(vocab,) bool: the reference's suppressed codec ids, [vocab-1024, vocab) except codec_eos."""
        v = self.cfg.text.vocab_size
        mask = torch.zeros(v, dtype=torch.bool, device=device)
        mask[max(v - 1024, 0):] = True
        mask[self.cfg.codec_eos_token_id] = False
        return mask


class TalkerTextFeed:
    """The talker's input recipe for one request: its prefill and the trailing-text entry of every talker step,
    fed incrementally with the thinker's generated tokens.

    How the reference builds it (transformers ``Qwen3OmniMoeForConditionalGeneration.generate``):

    * prompt = every user-turn position (a position belongs to the turn of the closest ``<|im_start|>`` at or
      before it; the turn's role is the token after that ``<|im_start|>``; system and earlier assistant turns
      are dropped). Multimodal pad positions take ``hidden_projection(thinker hidden after accept_hidden_layer
      layers)``, the others ``text_projection(thinker input embedding)``;
    * then 9 assistant positions: text side ``proj(<|im_start|>, assistant, \\n)``, 4×tts_pad, tts_bos,
      ``proj(A[3])``; codec side ``[0, 0, 0, nothink, think_bos, think_eos, speaker, codec_pad, codec_bos]``
      embeddings. ``A`` is the assistant stream: prompt ids from the last ``<|im_start|>assistant`` on, then
      the thinker's generated ids (normally ``A[3]`` is the first generated token);
    * talker decode step k adds trailing entry k: ``proj(A[4 + k])`` while that token lies inside the
      thinker's per-step inputs (the last generated token never does), then tts_eos once, then tts_pad. A
      thinker that stopped on a stop id at generated index e also gets tts_eos at entry e and tts_pad after;
    * positions are plain for text and audio prompts: prefill 0..n-1, decode step k at n + k, equal on t/h/w;
      with images or video in the user turns, TM-RoPE over the talker's ids (``talker_positions``) and decode
      step k at n + k + rope_delta.

    ``prefill_ready()`` and ``entry(k)`` return False/None while the needed thinker token is not known yet, so
    the caller WAITS (the reference never substitutes tts_pad for a token that is merely late).

    prompt_ids: the thinker prompt (n,); thinker_embeds: (n, thinker_hidden) thinker input embeddings (audio
    scattered in); thinker_hidden: (n, thinker_hidden) hidden states after ``accept_hidden_layer`` layers, or
    None for prompts without audio/image/video tokens; speaker_id: codec id of the voice; stop_ids /
    max_new_tokens: the thinker's, so a token can be known not to be the last one without waiting for the next
    (max_new_tokens None: always wait for the next token). Built with index_select/where from host-side
    indices: no boolean-mask indexing, no device read-back.
    """

    def __init__(self, model, prompt_ids: Sequence[int], thinker_embeds: torch.Tensor,
                 thinker_hidden: torch.Tensor | None, speaker_id: int, stop_ids: Sequence[int] = (),
                 max_new_tokens: int | None = None, vision: Sequence = ()):
        cfg = model.cfg
        if model.talker is None:
            raise ValueError("this model has no talker (text-only checkpoint or loaded with_talker=False)")
        self.model, self.talker = model, model.talker
        ids = [int(t) for t in prompt_ids]
        n = len(ids)
        if thinker_embeds.shape[0] != n or (thinker_hidden is not None and thinker_hidden.shape[0] != n):
            raise ValueError(f"thinker_embeds/thinker_hidden must have {n} rows (one per prompt id), got "
                             f"{thinker_embeds.shape[0]} and "
                             f"{None if thinker_hidden is None else thinker_hidden.shape[0]}")
        starts = [i for i in range(n - 1) if ids[i] == cfg.im_start_token_id and ids[i + 1] == cfg.assistant_token_id]
        if not starts:
            raise ValueError("the prompt has no '<|im_start|>assistant' turn to answer")
        self.assistant_start = starts[-1]
        self.p = n - self.assistant_start  # assistant-side prompt tokens (3 for '<|im_start|>assistant\n')
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self.max_new_tokens = max_new_tokens
        self.generated: list[int] = []
        self.finished = False
        self._proj_gen: list[torch.Tensor] = []
        device = thinker_embeds.device
        # user-turn positions on the host, exactly as the reference's cummax over <|im_start|> positions
        user, prev = [], 0
        for i, t in enumerate(ids):
            prev = i if t == cfg.im_start_token_id else prev
            user.append(ids[min(prev + 1, n - 1)] == cfg.user_token_id)
        th = cfg.thinker
        mm_ids = {th.audio_token_id, th.image_token_id, th.video_token_id}
        user_idx = [i for i in range(n) if user[i]]
        mm = [ids[i] in mm_ids for i in user_idx]
        tp = self.talker.text_projection
        with torch.inference_mode():
            idx = to_device(user_idx, torch.long, device)
            part = tp(thinker_embeds.index_select(0, idx))
            if any(mm):
                if thinker_hidden is None:
                    raise ValueError("the prompt has multimodal tokens: thinker_hidden (the thinker's hidden "
                                     "states after accept_hidden_layer layers) is required")
                hid = self.talker.hidden_projection(thinker_hidden.index_select(0, idx)).to(part.dtype)
                part = torch.where(to_device(mm, torch.bool, device)[:, None], hid, part)
            self.user_embeds = part                                               # (n_user, H)
            self.assistant_proj = tp(thinker_embeds[self.assistant_start:])      # (p, H)
            special = to_device([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id], torch.long,
                                device)
            self.tts_bos, self.tts_eos, self.tts_pad = tp(model.thinker.embed(special)).unbind(0)
            tc = self.talker.cfg
            h = tc.text.hidden_size
            codec_ids = to_device([tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id, speaker_id,
                                   tc.codec_pad_id, tc.codec_bos_id], torch.long, device)
            self.codec_prefix = torch.cat((torch.zeros(3, h, device=device, dtype=self.tts_pad.dtype),
                                           self.talker.embed_codec(codec_ids)))  # (9, H)
        # TM-RoPE for the talker prompt (user turns + 9 assistant positions) when it holds images or video.
        self.positions, self.rope_delta = None, 0.0
        if vision:
            self.positions, self.rope_delta = talker_positions(cfg, ids, user, vision)

    # -- thinker side ------------------------------------------------------------------------------------
    def push(self, tokens: Sequence[int], finished: bool = False) -> None:
        """Append the thinker's newly generated ids; ``finished`` once it stopped (stop id or length)."""
        if self.finished:
            raise RuntimeError("push() after the thinker finished")
        self.generated.extend(int(t) for t in tokens)
        self.finished = finished or any(t in self.stop_ids for t in self.generated)
        if self.max_new_tokens is not None and len(self.generated) >= self.max_new_tokens:
            self.finished = True

    # -- talker side -------------------------------------------------------------------------------------
    @property
    def prefill_len(self) -> int:
        return self.user_embeds.shape[0] + 9

    def _known(self, i: int) -> bool:
        """Generated token i exists and is known not to be the thinker's last token."""
        if i < 0:
            return True
        g = len(self.generated)
        if g > i + 1:
            return True
        return (not self.finished and g > i and self.max_new_tokens is not None and i + 1 < self.max_new_tokens)

    def _a_token_proj(self, a: int) -> torch.Tensor:
        """text_projection of assistant-stream token a (prompt or generated), projected once."""
        if a < self.p:
            return self.assistant_proj[a]
        i = a - self.p
        if len(self._proj_gen) <= i:
            ids = to_device(self.generated[len(self._proj_gen): i + 1], torch.long, self.tts_pad.device)
            with torch.inference_mode():
                self._proj_gen.extend(self.talker.text_projection(self.model.thinker.embed(ids)).unbind(0))
        return self._proj_gen[i]

    @property
    def silent(self) -> bool:
        """True when the thinker finished without anything to voice (its answer was a single token; the
        reference cannot build a talker prompt then)."""
        return self.finished and 3 >= self.p + len(self.generated) - 1

    def prefill_ready(self) -> bool:
        if self.finished:
            return not self.silent
        return self._known(3 - self.p)

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (embeds (n_user + 9, H), positions (3, n_user + 9) float32); call when ``prefill_ready()``."""
        if not self.prefill_ready():
            raise RuntimeError("the talker prefill needs the thinker's first token")
        # A[0..2] through _a_token_proj: a prompt ending in '<|im_start|>assistant' without its newline has
        # p = 2, and then A[2] is the first generated token, exactly as in the reference's assistant segment.
        text = torch.stack([self._a_token_proj(0), self._a_token_proj(1), self._a_token_proj(2),
                            self.tts_pad, self.tts_pad, self.tts_pad, self.tts_pad, self.tts_bos,
                            self._a_token_proj(3)])
        embeds = torch.cat((self.user_embeds, text + self.codec_prefix))
        if self.positions is not None:
            return embeds, self.positions.to(embeds.device)
        return embeds, text_positions(0, embeds.shape[0], embeds.device)

    def entry(self, k: int) -> torch.Tensor | None:
        """Trailing-text entry of talker decode step k (H,), or None while it depends on a thinker token that
        is not known yet (wait; never substitute)."""
        a = 4 + k
        i = a - self.p
        if not self.finished:
            if len(self.generated) >= k + 1 and (a < self.p or self._known(i)):
                return self._a_token_proj(a)
            return None
        last = self.p + len(self.generated) - 1  # stream length fed back to the thinker (its last token never is)
        if a > last:
            return self.tts_pad                     # past the reference's trailing_text_hidden
        e = next((j for j, t in enumerate(self.generated) if t in self.stop_ids), None)
        if e is not None and k > e:
            return self.tts_pad
        if e is not None and k == e or a == last:
            return self.tts_eos
        return self._a_token_proj(a)

    def all_entries(self) -> torch.Tensor:
        """(len, H) the reference's whole ``trailing_text_hidden`` (needs ``finished``)."""
        if not self.finished:
            raise RuntimeError("all_entries() needs the finished thinker output")
        length = max(self.p + len(self.generated) - 1 - 3, 0)
        if not length:
            return self.tts_pad.new_zeros(0, self.tts_pad.shape[0])
        return torch.stack([self.entry(k) for k in range(length)])


def talker_positions(cfg, ids: list[int], user: list[bool], vision: Sequence) -> tuple[torch.Tensor, float]:
    """(3, n_user + 9) float32 positions and rope delta of a talker prompt whose user turns hold images/video.

    The reference runs get_rope_index over the talker's ids (user-turn ids + the 9 assistant ids) with the
    request's image/video grids, so image-only and video-only prompts get the thinker's TM-RoPE rule there too.
    With audio as well, transformers crashes (the talker config has no audio_config) and, patched, gives
    audio-in-video 1-D positions (use_audio_in_video is not passed to the talker). omni_rt's rule: the talker
    follows the thinker's position rule for every block of its user turns, audio and audio-in-video included.
    """
    th = cfg.thinker
    merge = th.vision.spatial_merge_size if th.vision is not None else 2
    user_ids = [t for t, u in zip(ids, user) if u]
    # The media whose blocks lie in user turns, in order; audio token counts read off the ids.
    items, audio_counts, vi = [], [], 0
    i, n = 0, len(ids)
    while i < n:
        t = ids[i]
        if t == th.vision_start_token_id:
            if user[i]:
                items.append(vision[vi])
            vi += 1
        elif t == th.audio_start_token_id:
            j = i + 1
            while j < n and ids[j] != th.audio_end_token_id:
                j += 1
            if user[i]:
                audio_counts.append(sum(1 for x in ids[i + 1: j] if x == th.audio_token_id))
        i += 1
    # The 9 assistant positions are plain text for the rule (any non-special id).
    text_id = cfg.im_start_token_id
    return multimodal_positions(user_ids + [text_id] * 9, th, merge, audio_counts, items)

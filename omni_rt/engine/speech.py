"""Speech output: thinker states → talker prompt, talker prefill/decode steps, the batched code-predictor frame
step, and an offline driver (``generate_speech``) equal to transformers' ``generate(..., return_audio=True)``.

How the reference builds the talker's input (transformers ``Qwen3OmniMoeForConditionalGeneration.generate``):

* prompt = every user-turn position (a position belongs to the turn of the closest ``<|im_start|>`` at or
  before it; the turn's role is the token after that ``<|im_start|>``; system and earlier assistant turns are
  dropped). Multimodal pad positions take ``hidden_projection(thinker hidden after accept_hidden_layer
  layers)``, the others ``text_projection(thinker input embedding)``.
* then 9 assistant positions: text side ``proj(<|im_start|>, assistant, \\n)``, 4×tts_pad, tts_bos,
  ``proj(A[3])``; codec side ``[0, 0, 0, nothink, think_bos, think_eos, speaker, codec_pad, codec_bos]``
  embeddings. ``A`` is the assistant stream: prompt ids from the last ``<|im_start|>assistant`` on, then the
  thinker's generated ids (normally ``A[3]`` is the first generated token).
* talker decode step k adds trailing entry k: ``proj(A[4 + k])`` while that token lies inside the thinker's
  per-step inputs (the last generated token never does: it is never fed back, so never projected), then
  tts_eos once, then tts_pad. A thinker that stopped on a stop id at generated index e also gets tts_eos at
  entry e and tts_pad after it (the reference's batch fix; a no-op when the assistant prompt is 3 tokens).
* positions are plain for text and audio prompts: prefill 0..n-1, decode step k at n + k, equal on t/h/w; with
  images or video in the user turns, TM-RoPE over the talker's ids (``talker_positions``) and decode step k at
  n + k + rope_delta.
* code 0 sampling: repetition penalty over the talker's own generated code-0 ids (not the prompt), codec ids
  [vocab-1024, vocab) suppressed except codec_eos, stop on codec_eos. Each code 0 that is not a stop and not
  the last allowed token gets its residual codes from the code predictor (which samples with top_k 50,
  top_p 0.8, temperature 1 whenever the talker samples, else greedy). T talker tokens → T−1 frames.

Streaming use: ``TalkerTextFeed`` receives the thinker's tokens as they come; ``prefill_ready()`` and
``entry(k)`` return False/None while the needed thinker token is not known yet, so the engine WAITS (the
reference never substitutes tts_pad for a token that is merely late).
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

import torch

from ..profiling import census_stage
from ..request import SamplingParams
from .kv_cache import KVCachePool
from ..models.mrope import decode_positions, multimodal_positions
from .model_runner import DecoderRunner, text_positions
from .sampler import SamplingTensors, sample
from .text_generation import TextSequence, _sample as _sample_text

# the code predictor's fixed sampling settings when the talker samples (reference prepare_inputs_for_generation)
CP_TOP_K, CP_TOP_P, CP_TEMPERATURE = 50, 0.8, 1.0
_CP_SEED_SALT = 0x5DEECE66D


class TalkerTextFeed:
    """One request's talker text side: the prefill and the trailing-text entry of every talker step, fed
    incrementally with the thinker's generated tokens.

    prompt_ids: the thinker prompt (n,); thinker_embeds: (n, thinker_hidden) thinker input embeddings (audio
    scattered in); thinker_hidden: (n, thinker_hidden) hidden states after ``accept_hidden_layer`` layers, or
    None for prompts without audio/image/video tokens (only those positions read it); speaker_id: codec id of the voice. stop_ids / max_new_tokens: the thinker's, so a token can be known not to
    be the last one without waiting for the next (max_new_tokens None: always wait for the next token).
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
        tp = self.talker.text_projection
        with torch.inference_mode():
            ids_t = torch.tensor(ids, device=device)
            # user-turn positions, exactly as the reference's cummax over <|im_start|> positions
            pos = torch.arange(n, device=device)
            im_start = torch.where(ids_t == cfg.im_start_token_id, pos, torch.full_like(pos, -1))
            prev = torch.cummax(im_start, dim=0).values.clamp_min(0)
            role = ids_t[(prev + 1).clamp_max(n - 1)]
            user = role == cfg.user_token_id
            th = cfg.thinker
            mm = (ids_t == th.audio_token_id) | (ids_t == th.image_token_id) | (ids_t == th.video_token_id)
            h = self.talker.cfg.text.hidden_size
            user_part = torch.empty(n, h, device=device, dtype=thinker_embeds.dtype)
            if bool(mm.any()):
                if thinker_hidden is None:
                    raise ValueError("the prompt has multimodal tokens: thinker_hidden (the thinker's hidden "
                                     "states after accept_hidden_layer layers) is required")
                user_part[mm] = self.talker.hidden_projection(thinker_hidden[mm]).to(user_part.dtype)
            user_part[~mm] = tp(thinker_embeds[~mm]).to(user_part.dtype)
            self.user_embeds = user_part[user]                                  # (n_user, H)
            self.assistant_proj = tp(thinker_embeds[self.assistant_start:])      # (p, H)
            special = torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id],
                                   device=device)
            self.tts_bos, self.tts_eos, self.tts_pad = tp(model.thinker.embed(special)).unbind(0)
            tc = self.talker.cfg
            codec_ids = torch.tensor([tc.codec_nothink_id, tc.codec_think_bos_id, tc.codec_think_eos_id, speaker_id,
                                      tc.codec_pad_id, tc.codec_bos_id], device=device)
            self.codec_prefix = torch.cat((torch.zeros(3, h, device=device, dtype=self.tts_pad.dtype),
                                           self.talker.embed_codec(codec_ids)))  # (9, H)
        # TM-RoPE for the talker prompt (user turns + 9 assistant positions) when it holds images or video.
        self.positions, self.rope_delta = None, 0.0
        if vision:
            self.positions, self.rope_delta = talker_positions(cfg, ids, user.tolist(), vision)

    # -- thinker side ------------------------------------------------------------------------------------
    def push(self, tokens: Sequence[int], finished: bool = False) -> None:
        """Append the thinker's newly generated ids; ``finished`` once it stopped (stop id or length)."""
        if self.finished:
            raise RuntimeError("push() after the thinker finished")
        self.generated.extend(int(t) for t in tokens)
        self.finished = finished or any(t in self.stop_ids for t in self.generated)
        if self.max_new_tokens is not None and len(self.generated) >= self.max_new_tokens:
            self.finished = True

    def finish(self) -> None:
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
        while len(self._proj_gen) <= i:
            start = len(self._proj_gen)
            ids = torch.tensor(self.generated[start: i + 1], device=self.tts_pad.device)
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
        """→ (embeds (n_user + 9, H), positions (3, n_user + 9)); call when ``prefill_ready()``."""
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


@dataclasses.dataclass
class TalkerRequest:
    """One request's talker progress. ``code0`` are the talker's generated tokens, ``frames`` the finished
    frames (each (G,) int64 on the device)."""

    seq_id: int
    feed: TalkerTextFeed
    params: SamplingParams      # resolved for the talker
    seed: int
    code0: list[int] = dataclasses.field(default_factory=list)
    frames: list[torch.Tensor] = dataclasses.field(default_factory=list)
    last_hidden: torch.Tensor | None = None   # (H,) post-norm hidden of the position that produced code0[-1]
    pending: torch.Tensor | None = None       # (H,) code-embedding sum of frames[-1], awaiting its text entry
    seen: torch.Tensor | None = None          # (vocab,) bool generated code-0 ids (repetition penalty)
    finish_reason: str | None = None
    stop_ids: frozenset = frozenset()

    @property
    def started(self) -> bool:
        return bool(self.code0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def step(self) -> int:
        """Index of the next talker decode step (= trailing entry it consumes)."""
        return len(self.code0) - 1

    def needs_frame(self) -> bool:
        return self.started and not self.finished and self.pending is None and len(self.frames) < len(self.code0)

    def codes(self) -> torch.Tensor:
        """(G, frames) int64."""
        g = self.feed.talker.cfg.num_code_groups
        if not self.frames:
            return torch.zeros(g, 0, dtype=torch.long, device=self.feed.tts_pad.device)
        return torch.stack(self.frames, dim=1)


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


def new_talker_request(seq_id: int, feed: TalkerTextFeed, params: SamplingParams | None = None) -> TalkerRequest:
    p = (params or SamplingParams()).resolved("talker")
    tc = feed.talker.cfg
    stop = frozenset(p.stop_token_ids if p.stop_token_ids is not None else (tc.codec_eos_token_id,))
    seed = p.seed if p.seed is not None else random.getrandbits(63)
    seen = torch.zeros(tc.text.vocab_size, dtype=torch.bool, device=feed.tts_pad.device)
    return TalkerRequest(seq_id, feed, p, seed, seen=seen, stop_ids=stop)


def _sample_code0(talker, hidden: torch.Tensor, reqs: Sequence[TalkerRequest]) -> list[int]:
    """hidden: (B, H) post-norm → code 0 per request, with the talker's penalty/suppression/sampling."""
    return _sample_code0_device(talker, hidden, reqs).tolist()


def _sample_code0_device(talker, hidden: torch.Tensor, reqs: Sequence[TalkerRequest]) -> torch.Tensor:
    """As ``_sample_code0`` without the read-back: code 0 per request (B,) int64 on the device."""
    logits = talker.logits(hidden)
    st = SamplingTensors.build([r.params for r in reqs], [len(r.code0) for r in reqs], [r.seed for r in reqs],
                               hidden.device)
    seen = torch.stack([r.seen for r in reqs])
    ids = sample(logits, st, seen, talker.suppress_mask(hidden.device))
    for j, r in enumerate(reqs):
        r.seen.index_fill_(0, ids[j:j + 1], True)   # a 1-element index: no host read (a 0-d one would be)
    return ids


def _accept(reqs: Sequence[TalkerRequest], hidden: torch.Tensor, ids: list[int]) -> None:
    for j, (r, tok) in enumerate(zip(reqs, ids)):
        r.code0.append(tok)
        r.last_hidden = hidden[j]
        if tok in r.stop_ids:
            r.finish_reason = "stop"
        elif len(r.code0) >= r.params.max_new_tokens:
            r.finish_reason = "length"   # the last code 0 never gets its residual codes (reference: T−1 frames)


def _free_finished(runner: DecoderRunner, reqs: Sequence[TalkerRequest]) -> None:
    """A finished request's talker KV goes back to the pool at once (its frames are already complete)."""
    for r in reqs:
        if r.finished:
            runner.free(r.seq_id)


@torch.inference_mode()
def talker_prefill(model, runner: DecoderRunner, reqs: Sequence[TalkerRequest]) -> list[int]:
    """Run the talker prompt of every request (chunked varlen prefill) and sample its first code 0. Requests
    that finish (here or in ``talker_decode_step``) have their talker KV freed."""
    if not reqs:
        return []
    inputs = [r.feed.prefill() for r in reqs]
    hidden, _ = runner.prefill([r.seq_id for r in reqs], [e for e, _ in inputs], [p for _, p in inputs])
    return talker_first_code(model, runner, reqs, torch.stack([h[-1] for h in hidden]))


@torch.inference_mode()
def talker_first_code(model, runner: DecoderRunner, reqs: Sequence[TalkerRequest], last: torch.Tensor) -> list[int]:
    """Sample each request's first code 0 from the post-norm hidden state of its prompt's last position
    (last: (B, H)), for callers that ran the talker prefill themselves (e.g. in budgeted chunks)."""
    ids = _sample_code0(model.talker, last, reqs)
    _accept(reqs, last, ids)
    _free_finished(runner, reqs)
    return ids


def _frame_sampling(reqs: Sequence[TalkerRequest], device):
    from ..models.code_predictor import FrameSampling

    if all(r.params.temperature == 0 for r in reqs):
        return None
    f32, i64 = torch.float32, torch.int64
    return FrameSampling(
        temperature=torch.tensor([CP_TEMPERATURE if r.params.temperature > 0 else 0.0 for r in reqs], dtype=f32,
                                 device=device),
        top_k=torch.full((len(reqs),), CP_TOP_K, dtype=i64, device=device),
        top_p=torch.full((len(reqs),), CP_TOP_P, dtype=f32, device=device),
        seeds=torch.tensor([(r.seed ^ _CP_SEED_SALT) & ((1 << 63) - 1) for r in reqs], dtype=i64, device=device),
        frame_index=torch.tensor([len(r.frames) for r in reqs], dtype=i64, device=device))


@torch.inference_mode()
def code_predictor_step(model, reqs: Sequence[TalkerRequest], workspace=None, frame_graph=None) -> None:
    """The batched frame step: residual codes for every request's newest code 0 (``needs_frame()``). Appends
    the (G,) frame and sets ``pending`` (the next talker input's codec part). No host sync inside.

    frame_graph: an ``engine.graphs.code_predictor_graphs`` runner (the whole 15-step loop, sampling included,
    replayed as one CUDA graph); None runs ``CodePredictor.frame`` eagerly.
    """
    reqs = [r for r in reqs if r.needs_frame()]
    if not reqs:
        return
    with census_stage("code_predictor_frame"):
        _code_predictor_device(model, reqs, workspace, frame_graph)


def _code_predictor_device(model, reqs: Sequence[TalkerRequest], workspace, frame_graph) -> None:
    talker = model.talker
    past = torch.stack([r.last_hidden for r in reqs])
    code0 = torch.tensor([r.code0[-1] for r in reqs], device=past.device)
    c0_embed = talker.embed_codec(code0)
    sampling = _frame_sampling(reqs, past.device)
    if frame_graph is None:
        codes, embed_sum = talker.code_predictor.frame(past, c0_embed, workspace, sampling)
    else:
        values = {"past_hidden": past, "code0_embed": c0_embed}
        if sampling is not None:
            values.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          seeds=sampling.seeds, frame_index=sampling.frame_index)
        out = frame_graph.run(len(reqs), values)
        # graph outputs are views of static buffers: copy what outlives the next replay
        codes, embed_sum = out["codes"].clone(), out["next_embed"].clone()
    full = torch.cat((code0[:, None], codes), dim=1)
    for j, r in enumerate(reqs):
        r.frames.append(full[j])
        r.pending = embed_sum[j]


@torch.inference_mode()
def talker_decode_step(model, runner: DecoderRunner, reqs: Sequence[TalkerRequest]) -> list[TalkerRequest]:
    """One talker step for every request whose frame is done and whose trailing-text entry is known; the
    others wait. Returns the requests that stepped."""
    with census_stage("talker_decode"):
        ready, hidden, ids = _talker_decode_device(model, runner, reqs)
    if not ready:
        return []
    ids = ids.tolist()   # the step's read-back (stop rule)
    for r in ready:
        r.pending = None
    _accept(ready, hidden, ids)
    _free_finished(runner, ready)
    return ready


def _talker_decode_device(model, runner: DecoderRunner, reqs: Sequence[TalkerRequest]):
    """The device part of ``talker_decode_step``: (ready requests, post-norm hidden (B, H), code 0 (B,))."""
    ready, embeds = [], []
    for r in reqs:
        if r.finished or r.pending is None:
            continue
        e = r.feed.entry(r.step)
        if e is None:
            continue
        ready.append(r)
        embeds.append(r.pending + e)
    if not ready:
        return [], None, None
    device = embeds[0].device
    pos = decode_positions([r.feed.prefill_len + r.step for r in ready], [r.feed.rope_delta for r in ready], device)
    hidden, _ = runner.decode([r.seq_id for r in ready], torch.stack(embeds), pos)
    return ready, hidden, _sample_code0_device(model.talker, hidden, ready)


@dataclasses.dataclass
class SpeechOutput:
    token_ids: list[int]                  # thinker output (stop id included when it stopped on one)
    thinker_finish_reason: str
    codes: torch.Tensor | None = None     # (G, frames) int64
    code0: list[int] | None = None        # the talker's generated tokens (T; frames = T − 1 unless silent)
    wav: torch.Tensor | None = None       # (samples,) float32 at 24 kHz
    talker_finish_reason: str | None = None


def _pool(n_layers: int, kv_heads: int, head_dim: int, tokens: int, block_size: int, dtype, device) -> KVCachePool:
    return KVCachePool(n_layers, math.ceil(tokens / block_size) + 2, block_size, kv_heads, head_dim, dtype, device)


@torch.inference_mode()
def generate_speech(model, prompt_ids: Sequence[int], audio_embeds: torch.Tensor | None = None, *,
                    speaker: str = "Ethan", thinker_params: SamplingParams | None = None,
                    talker_params: SamplingParams | None = None, return_audio: bool = True,
                    block_size: int = 16, max_prefill_tokens: int = 8192) -> SpeechOutput:
    """Offline driver: thinker generation interleaved with talker steps (the talker starts as soon as the
    thinker's first token exists and waits whenever it runs ahead of the text), then Code2Wav.

    prompt_ids: thinker prompt with audio pads expanded; audio_embeds: (n_audio_tokens, thinker_hidden).
    Thinker stop ids default to <|im_end|>. With ``return_audio`` False only the thinker runs.
    """
    cfg = model.cfg
    if return_audio and model.talker is None:
        raise ValueError("audio output requested but this checkpoint/model has no talker "
                         "(text-only checkpoint or loaded with with_talker=False); use return_audio=False")
    speaker_id = cfg.talker.speaker(speaker) if return_audio else None
    thinker = model.thinker
    device = thinker.lm_head.weight.device
    dtype = thinker.lm_head.weight.dtype
    tp = (thinker_params or SamplingParams()).resolved("thinker")
    stop = frozenset(tp.stop_token_ids if tp.stop_token_ids is not None else (cfg.im_end_token_id,))
    seq = TextSequence(0, [int(t) for t in prompt_ids], tp, stop,
                       tp.seed if tp.seed is not None else random.getrandbits(63))
    tc = cfg.thinker.text
    th_runner = DecoderRunner(thinker.forward, _pool(tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim,
                                                     len(seq.prompt) + tp.max_new_tokens, block_size, dtype,
                                                     device), max_prefill_tokens)
    ids = torch.tensor(seq.prompt, device=device)
    x = thinker.embed(ids, audio_embeds)
    tap = cfg.talker.accept_hidden_layer if return_audio else None
    talker_runner = req = None
    try:
        hidden, taps = th_runner.prefill([0], [x], [text_positions(0, len(seq.prompt), device)], tap_layer=tap)
        seq.push(_sample_text(thinker, hidden[0][-1:], [seq])[0])
        if return_audio:
            feed = TalkerTextFeed(model, seq.prompt, x, taps[0], speaker_id, stop, tp.max_new_tokens)
            feed.push(seq.output, seq.finished)
            req = new_talker_request(1, feed, talker_params)
            kc = cfg.talker.text
            talker_runner = DecoderRunner(model.talker.forward, _pool(
                kc.num_hidden_layers, kc.num_key_value_heads, kc.head_dim,
                feed.prefill_len + req.params.max_new_tokens, block_size, dtype, device), max_prefill_tokens)
            workspace = model.talker.code_predictor.workspace(1)
        while True:
            if not seq.finished:
                tok = torch.tensor([seq.output[-1]], device=device)
                pos = torch.tensor([len(seq.prompt) + len(seq.output) - 1], device=device)
                h, _ = th_runner.decode([0], thinker.embed(tok), pos.expand(3, -1))
                seq.push(_sample_text(thinker, h, [seq])[0])
                if req is not None:
                    req.feed.push(seq.output[-1:], seq.finished)
                if seq.finished:
                    th_runner.free(0)
            if req is None:
                if seq.finished:
                    break
                continue
            if req.feed.silent:
                req.finish_reason = "silent"
            if not req.started and not req.finished and req.feed.prefill_ready():
                talker_prefill(model, talker_runner, [req])
            else:
                code_predictor_step(model, [req], workspace)
                talker_decode_step(model, talker_runner, [req])
            if req.finished and seq.finished:
                break
    finally:
        th_runner.free(0)
        if talker_runner is not None:
            talker_runner.free(1)
    out = SpeechOutput(seq.output, seq.finish_reason)
    if req is not None:
        out.codes = req.codes()
        out.code0 = list(req.code0)
        out.talker_finish_reason = req.finish_reason
        out.wav = model.code2wav.decode(out.codes[None])[0].float()
    return out

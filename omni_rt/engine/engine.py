"""The engine: one thread that owns the device and interleaves every request's stages.

Each ``step()``:
1. admits waiting requests while a batch slot is free and the KV pool can reserve the request's whole
   length (prompt + max_new_tokens), so a running request can never run out of pages mid-way; a request
   that could never fit is refused with a clear error, others wait (back-pressure);
2. runs at most ``max_prefill_tokens`` of thinker prefill (chunked, so a long audio prompt does not stall the
   requests that are already decoding);
3. runs one batched thinker decode step for every decoding request;
4. runs one speech step (talker step → code-predictor frame → streaming Code2Wav) for every speaking request
   whose next thinker token is available — so the first audio packet leaves after the first talker frame,
   while the thinker is still generating;
5. emits text deltas and audio chunks to each request's queue and retires finished or cancelled requests,
   returning their KV blocks and decoder state at once.

Failure isolation: host-side errors in one request's own work (bad audio, unknown speaker, a token-count
mismatch) fail that request only. An error inside a batched device computation is treated as a device fault:
it is sticky and fails every request in flight; the Runtime must be recreated.
"""
from __future__ import annotations

import collections
import random
import threading
import time
import traceback
import warnings
from typing import Callable

import torch

from .. import audio as audio_mod
from ..errors import DeviceFault
from ..models.omni import OmniModel
from ..profiling import StageTimer, census_stage
from ..request import StreamChunk
from .graphs import ThinkerDecodeGraphs
from .kv_cache import KVCachePool
from ..models.mrope import decode_positions, multimodal_positions
from .model_runner import DecoderRunner, text_positions
from .requests import EngineRequest, Phase
from .sampler import SamplingTensors, sample
from .text_output import TextStep


class Engine:
    def __init__(self, model: OmniModel, device: torch.device, dtype: torch.dtype, max_batch_size: int,
                 kv_tokens: int, block_size: int = 16, max_prefill_tokens: int = 4096,
                 max_model_len: int = 32768, speech_factory: Callable | None = None, cuda_graphs: bool = False):
        self.model, self.device, self.dtype = model, device, dtype
        self.cfg = model.cfg
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len
        tc = self.cfg.thinker.text
        num_blocks = max(1, -(-kv_tokens // block_size))
        self.pool = KVCachePool(tc.num_hidden_layers, num_blocks, block_size, tc.num_key_value_heads,
                                tc.head_dim, dtype, device)
        self.runner = DecoderRunner(model.thinker.forward, self.pool, max_prefill_tokens)
        # Thinker decode through CUDA graphs (one per batch bucket), only on CUDA; CPU keeps the eager path.
        self.cuda_graphs = cuda_graphs and torch.device(device).type == "cuda"
        self.decode_graphs = None
        if cuda_graphs and torch.device(device).type == "cuda":
            try:
                self.decode_graphs = ThinkerDecodeGraphs(model.thinker, self.pool, max_batch_size, max_model_len)
                self.decode_graphs.capture()
            except Exception as e:  # never lose the runtime to a capture problem: decode eagerly instead
                warnings.warn(f"CUDA-graph capture of the thinker decode step failed ({e!r}); "
                              f"falling back to eager decode", RuntimeWarning, stacklevel=2)
                self.decode_graphs = None
        self.speech = speech_factory(self) if (speech_factory is not None and model.has_talker) else None
        self.tap_layer = self.cfg.talker.accept_hidden_layer if model.has_talker else None
        self.vocab = tc.vocab_size
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.running: list[EngineRequest] = []
        self.requests: dict[str, EngineRequest] = {}
        self._next_seq = 0
        self._lock = threading.Condition()
        self._stop = False
        self.fault: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.timer = StageTimer()   # wall time per stage, summed over steps (and NVTX ranges)

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="omni_rt-engine", daemon=True)
        self._thread.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the engine thread; every request in flight or queued ends with a RuntimeError. Idempotent.

        wait: join the thread (never when called from the engine thread itself, e.g. by a finalizer)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)

    @property
    def closed(self) -> bool:
        return self._stop

    def submit(self, req: EngineRequest) -> None:
        if self.fault is not None:
            raise DeviceFault(f"the runtime hit a device fault and must be recreated: {self.fault}")
        self._check_fits(req)
        with self._lock:
            if self._stop:  # checked under the lock the loop drains under: no request can slip past the drain
                raise RuntimeError("the runtime is closed: create a new omni_rt.Runtime")
            if req.request_id in self.requests:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            self.requests[req.request_id] = req
            self.waiting.append(req)
            self._lock.notify_all()

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its resources are released by the engine thread at its next step."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None:
                return False
            req.cancelled = True
            self._lock.notify_all()
            return True

    def _check_fits(self, req: EngineRequest) -> None:
        total = len(req.prompt) + req.thinker_params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_new_tokens "
                             f"({req.thinker_params.max_new_tokens}) = {total} exceeds max_model_len "
                             f"{self.max_model_len}")
        need = self.pool.manager.blocks_for_tokens(total)
        if need > self.pool.num_blocks:
            raise ValueError(f"request needs {need} KV blocks ({total} tokens) but the pool has only "
                             f"{self.pool.num_blocks}; lower max_new_tokens or raise the KV memory")
        if self.speech is not None and req.speaking:
            self.speech.check_fits(req)

    # -------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and not self.running:
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except BaseException as e:  # a fault in batched device work: sticky, fails everything in flight
                self._fail_all(e)
        # Closed with requests still in flight: end their streams instead of leaving consumers waiting.
        closed = RuntimeError("the runtime was closed before this request finished")
        with self._lock:
            running, waiting = list(self.running), list(self.waiting)
            self.waiting.clear()
            self.requests.clear()
        for req in running:  # return their KV blocks and speech slots, so the final stats show them free
            try:
                self._release(req)
            except Exception:  # noqa: BLE001 - a faulted engine's bookkeeping may be gone; the streams still end
                pass
        self.running.clear()
        for req in running + waiting:
            req.out.put(StreamChunk(req.request_id, finished=True, error=closed))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> None:
        self._reap_cancelled()
        with self.timer("admit"):
            self._admit()
        with self.timer("thinker_prefill"):
            self._prefill_step()
        with self.timer("thinker_decode"):
            self._decode_step()
        if self.speech is not None:
            with self.timer("speech"):
                self._speech_step()
        self._retire()

    # ------------------------------------------------------------------------------------------ admission
    def _outstanding(self) -> int:
        """Blocks promised to running requests for their whole length but not allocated yet."""
        total = 0
        for r in self.running:
            if r.thinker_finished or r.reserved_blocks == 0:
                continue
            held = (self.pool.manager.blocks_for_tokens(self.pool.num_tokens(r.seq_id))
                    if self.pool.has_seq(r.seq_id) else 0)
            total += max(0, r.reserved_blocks - held)
        return total

    def _blocks_for(self, req: EngineRequest) -> int:
        return self.pool.manager.blocks_for_tokens(len(req.prompt) + req.thinker_params.max_new_tokens)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            need = self._blocks_for(req)
            if need > self.pool.num_free_blocks() - self._outstanding():
                break  # back-pressure: wait for running requests to return blocks
            if self.speech is not None and req.speaking and not self.speech.can_admit(req):
                break
            self.waiting.popleft()
            try:
                self._prepare(req)
            except Exception as e:  # this request's own inputs are bad: fail it alone
                self._fail(req, e)
                continue
            req.seq_id = self._next_seq
            self._next_seq += 1
            req.reserved_blocks = need
            req.phase = Phase.PREFILL
            self.running.append(req)
            if self.speech is not None and req.speaking:
                self.speech.admit(req)

    def _prepare(self, req: EngineRequest) -> None:
        """Encode the request's audios and build its prompt embeddings (host-checked, per request)."""
        thinker = self.model.thinker
        audio_embeds = None
        counts: list[int] = []
        if req.audios:
            n_mels = self.cfg.thinker.audio.num_mel_bins
            mels = [audio_mod.log_mel(a, device=self.device, n_mels=n_mels) for a in req.audios]
            lens = [m.shape[1] for m in mels]
            counts = [int(thinker.audio_tower.num_audio_tokens(n)) for n in lens]
            pads = sum(1 for t in req.prompt if t == self.cfg.thinker.audio_token_id)
            if pads != sum(counts):
                raise ValueError(f"the prompt has {pads} <|audio_pad|> tokens but its audios give {sum(counts)} "
                                 f"({counts}); expand each audio's pad run to its token count")
            with self.timer("audio_encode"), census_stage("audio_encode"):
                audio_embeds = thinker.audio_tower(torch.cat(mels, dim=1).to(self.dtype), lens)
        elif any(t == self.cfg.thinker.audio_token_id for t in req.prompt):
            raise ValueError("the prompt has <|audio_pad|> tokens but no audio was given")
        if max(req.prompt) >= self.vocab:
            raise ValueError(f"token id {max(req.prompt)} is outside the vocabulary ({self.vocab})")
        ids = torch.tensor(req.prompt, device=self.device)
        image_embeds = video_embeds = None
        th = self.cfg.thinker
        if req.vision:
            if thinker.visual is None:
                raise ValueError("this checkpoint has no vision tower, so it cannot take images or video")
            merge = th.vision.spatial_merge_size
            # Validates every pad run against its medium (a ValueError naming the item) before any encoding.
            positions, req.rope_delta = multimodal_positions(req.prompt, th, merge, counts,
                                                             [v.item for v in req.vision])
            req.positions = positions.to(self.device)
            with self.timer("vision_encode"):
                feats, taps = thinker.visual.encode([(v.pixel_values, v.item.grid) for v in req.vision], self.dtype)
            image_embeds, video_embeds, req.deepstack = _scatter_vision(
                ids, [v.item.kind for v in req.vision], feats, taps, th.image_token_id, th.video_token_id)
        else:
            if any(t in (th.image_token_id, th.video_token_id) for t in req.prompt):
                raise ValueError("the prompt has <|image_pad|> / <|video_pad|> tokens but no image or video was "
                                 "given")
            req.positions = text_positions(0, len(req.prompt), self.device)
        req.embeds = thinker.embed(ids, audio_embeds, image_embeds, video_embeds)
        req.audio_embeds = audio_embeds

    # ------------------------------------------------------------------------------------------ thinker
    def _tap(self, reqs: list[EngineRequest]) -> int | None:
        return self.tap_layer if any(r.speaking for r in reqs) else None

    def _prefill_step(self) -> None:
        todo = [r for r in self.running if r.phase == Phase.PREFILL and not r.cancelled]
        if not todo:
            return
        budget = self.max_prefill_tokens
        batch, chunks, positions, deepstack = [], [], [], []
        for r in todo:
            if budget <= 0:
                break
            n = min(len(r.prompt) - r.prefilled, budget)
            budget -= n
            batch.append(r)
            chunks.append(r.embeds[r.prefilled: r.prefilled + n])
            positions.append(r.positions[:, r.prefilled: r.prefilled + n])
            deepstack.append(_deepstack_slice(r.deepstack, r.prefilled, n))
        with census_stage("thinker_prefill"):
            hidden, taps = self.runner.prefill([r.seq_id for r in batch], chunks, positions, self._tap(batch),
                                               deepstack if any(d is not None for d in deepstack) else None)
            finished = [j for j, (r, c) in enumerate(zip(batch, chunks)) if r.prefilled + c.shape[0] == len(r.prompt)]
            tokens = (self._sample_device(self.model.thinker.logits(torch.stack([hidden[j][-1] for j in finished])),
                                          [batch[j] for j in finished]) if finished else None)
        for r, tap, c in zip(batch, taps, chunks):
            r.prefilled += c.shape[0]
            if r.speaking and tap is not None:
                r.prompt_taps.append(tap)
        if finished:
            for j, tok in zip(finished, tokens.tolist()):   # the step's read-back
                batch[j].phase = Phase.DECODE
                self._push_token(batch[j], tok)

    def _decode_step(self) -> None:
        active = [r for r in self.running if r.phase == Phase.DECODE and not r.thinker_finished
                  and not r.cancelled]
        if not active:
            return
        if self.decode_graphs is not None:
            params = [r.thinker_params for r in active]
            seen = ([r.prompt + r.output for r in active]
                    if any(p.repetition_penalty != 1.0 for p in params) else None)
            out = self.decode_graphs.decode([r.seq_id for r in active], [r.output[-1] for r in active],
                                            [float(decode_positions([len(r.prompt) + len(r.output) - 1],
                                                                    [r.rope_delta], "cpu")[0, 0])
                                             for r in active], params,
                                            [len(r.output) for r in active], [r.thinker_seed for r in active], seen)
            for r, tok in zip(active, out["next_ids"].tolist()):
                self._push_token(r, tok)
            return
        ids = torch.tensor([r.output[-1] for r in active], device=self.device)
        pos = decode_positions([len(r.prompt) + len(r.output) - 1 for r in active], [r.rope_delta for r in active],
                               self.device)
        with census_stage("thinker_decode"):
            embeds = self.model.thinker.embed(ids)
            hidden, _ = self.runner.decode([r.seq_id for r in active], embeds, pos)
            tokens = self._sample_device(self.model.thinker.logits(hidden), active)
        for r, tok in zip(active, tokens.tolist()):
            self._push_token(r, tok)

    def _sample_device(self, logits: torch.Tensor, reqs: list[EngineRequest]) -> torch.Tensor:
        """logits (B, vocab) -> next ids (B,) on the device (no read-back)."""
        params = [r.thinker_params for r in reqs]
        st = SamplingTensors.build(params, [len(r.output) for r in reqs], [r.thinker_seed for r in reqs],
                                   self.device)
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(len(reqs), logits.shape[-1], dtype=torch.bool, device=self.device)
            for i, r in enumerate(reqs):
                seen[i, torch.tensor(r.prompt + r.output, device=self.device)] = True
        return sample(logits, st, seen)

    def _push_token(self, req: EngineRequest, token: int) -> None:
        req.push_token(token)
        if req.text_out is None:   # plain detokenizing: every id is settled at once
            step = TextStep(text=req.detok.push([token]), release=[token], finished=req.thinker_finished)
        else:
            step = req.text_out.push(token, final=req.thinker_finished)
            if step.stopped:
                req.stop_here("stop")   # a stop string: the thinker ends here
        if req.thinker_finished:
            self.runner.free(req.seq_id)  # the talker only needs the saved embeddings, not the thinker KV
            req.phase = Phase.DONE
        if self.speech is not None and req.speaking and req.error is None and (step.release or step.finished):
            try:
                self.speech.on_token(req, step.release, step.finished)
            except Exception as e:  # this request's own speech setup failed: fail it alone
                self._fail(req, e)
                return
        req.out.put(StreamChunk(req.request_id, text_delta=step.text, token_ids=[token],
                                reasoning_delta=step.reasoning))

    # ------------------------------------------------------------------------------------------ speech
    def _speech_step(self) -> None:
        speaking = [r for r in self.running if r.speaking and not r.cancelled and self.speech.active(r)]
        if not speaking:
            return
        for r, pcm in self.speech.step(speaking):
            if pcm is not None and pcm.size:
                if r.t_first_audio is None:
                    r.t_first_audio = time.perf_counter()
                r.audio_samples += pcm.size
                r.out.put(StreamChunk(r.request_id, audio=pcm))

    # ------------------------------------------------------------------------------------------ retire
    def _request_done(self, req: EngineRequest) -> bool:
        if not req.thinker_finished:
            return False
        return self.speech is None or not req.speaking or self.speech.finished(req)

    def _release(self, req: EngineRequest) -> None:
        self.runner.free(req.seq_id)
        if self.speech is not None and req.speaking:
            self.speech.release(req)
        req.reserved_blocks = 0
        if req in self.running:
            self.running.remove(req)
        with self._lock:
            self.requests.pop(req.request_id, None)

    def _retire(self) -> None:
        for req in list(self.running):
            if self._request_done(req):
                tail = req.detok.push([], final=True) if req.text_out is None else ""
                self._release(req)
                req.out.put(StreamChunk(req.request_id, text_delta=tail, finished=True, metrics=req.metrics()))

    def _reap_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._release(req)
            req.out.put(StreamChunk(req.request_id, finished=True, metrics=req.metrics(),
                                    error=CancelledRequest(f"request {req.request_id} was aborted")))
        with self._lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self.requests.pop(req.request_id, None)
                req.out.put(StreamChunk(req.request_id, finished=True,
                                        error=CancelledRequest(f"request {req.request_id} was aborted")))

    def _fail(self, req: EngineRequest, error: BaseException) -> None:
        req.error = error
        self._release(req)
        req.out.put(StreamChunk(req.request_id, finished=True, error=error))

    def _fail_all(self, error: BaseException) -> None:
        self.fault = error
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        fault = DeviceFault(f"engine step failed ({detail}); every request in flight was failed and the "
                            f"runtime must be recreated")
        fault.__cause__ = error
        for req in list(self.running) + list(self.waiting):
            req.out.put(StreamChunk(req.request_id, finished=True, error=fault))
        self.running.clear()
        self.waiting.clear()
        with self._lock:
            self.requests.clear()
            self._stop = True


def _deepstack_slice(deepstack, start: int, n: int):
    """A request's deepstack (mask over its prompt, features over its visual tokens) for prompt tokens
    [start, start + n): a prefill chunk may begin or end inside an image."""
    if deepstack is None:
        return None
    mask, feats = deepstack
    before = int(mask[:start].sum())
    inside = mask[start: start + n]
    count = int(inside.sum())
    if count == 0:
        return None
    return inside, [f[before: before + count] for f in feats]


def _scatter_vision(ids: torch.Tensor, kinds: list[str], feats: list[torch.Tensor], taps: list[list[torch.Tensor]],
                    image_id: int, video_id: int):
    """Image and video features in pad order, and the deepstack features joined in *position* order (images and
    videos interleaved as they appear, as the reference's joint masks do, modeling ≈ 2025-2039)."""
    img = [f for f, k in zip(feats, kinds) if k == "image"]
    vid = [f for f, k in zip(feats, kinds) if k == "video"]
    image_embeds = torch.cat(img) if img else None
    video_embeds = torch.cat(vid) if vid else None
    is_img, is_vid = ids == image_id, ids == video_id
    mask = is_img | is_vid
    joint_img = is_img[mask]
    joint = []
    for j in range(len(taps[0]) if taps else 0):
        ti = [t[j] for t, k in zip(taps, kinds) if k == "image"]
        tv = [t[j] for t, k in zip(taps, kinds) if k == "video"]
        ref = (ti or tv)[0]
        out = ref.new_zeros(int(mask.sum()), ref.shape[-1])
        if ti:
            out[joint_img] = torch.cat(ti)
        if tv:
            out[~joint_img] = torch.cat(tv)
        joint.append(out)
    return image_embeds, video_embeds, ((mask, joint) if joint else None)


class CancelledRequest(Exception):
    """The request was aborted (abort(), leaving the stream loop, or cancelling the astream task)."""


def new_seed() -> int:
    return random.getrandbits(63)


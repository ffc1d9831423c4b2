"""The engine: one thread that owns the device and runs every request's stages in one step.

Each ``step()``:
1. admits waiting requests (``Scheduler``: a free slot and both KV pools can reserve the request's whole
   length) and encodes their audio / embeds their prompt — a request whose own inputs are bad fails alone;
2. runs thinker prefill chunks within the step's token budget; a request whose prompt completes samples its
   first token, which at once builds its talker prompt (``models.talker.TalkerTextFeed``);
3. runs, in one transaction: the talker prefill chunks (rest of the budget), the speech frame for every
   speaking request (talker decode + code-0 sampling for those whose next text entry is known, the
   code-predictor frame, one streaming Code2Wav step), then one batched thinker decode step — so a request's
   first audio packet leaves in the same step as its thinker's first token, before that step's thinker decode;
4. reads back everything the step produced (ids, codes, PCM) in one synchronisation, commits it, emits text
   deltas and audio chunks, and retires finished or cancelled requests, returning their blocks and slot.

Commit on success: stages compute into fresh tensors; KV appends are journaled and device state (Code2Wav
state, codec inputs, seen code-0 ids) and host state change only when a transaction succeeded. A failure that
is not a device fault (CUDA error, out of memory) is rolled back and the transaction retried for each of its
requests alone: the one that fails again fails by itself, the others advance exactly once. A device fault is
sticky: every request fails and ``stats()["fault"]`` says why.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback

import numpy as np
import torch

from ..errors import CancelledRequest, DeviceFault
from ..models.layers import text_positions
from ..models.talker import TalkerTextFeed
from ..profiling import StageTimer, census_stage
from ..request import StreamChunk
from ..sampling import params_within_cap, to_device
from .config import EngineConfig
from .scheduler import Scheduler
from .sequence import Request
from .stages import Stages, readback
from .text_output import TextStep

_TALKER_SEQ_BASE = 1 << 40  # talker KV sequence ids live apart from the thinker's


def is_device_fault(e: BaseException) -> bool:
    """Only real device failures poison the runtime; anything else is attributable to a request."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, DeviceFault)):
        return True
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    text = str(e)
    return any(s in text for s in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert"))


class Engine:
    def __init__(self, model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.device, self.dtype = model, cfg, torch.device(device), dtype
        self.stages = Stages(model, cfg, device, dtype)
        self.sched = Scheduler(cfg, self.stages.thinker_pool, self.stages.talker_pool)
        self.tap_layer = model.cfg.talker.accept_hidden_layer if model.has_talker else None
        self.vocab = model.cfg.thinker.text.vocab_size
        self.groups = model.cfg.talker.num_code_groups if model.has_talker else 0
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._stop = False
        self.fault: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.timer = StageTimer()
        self.warmup_s = self.stages.warmup_s

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

    def submit(self, req: Request) -> None:
        if self.fault is not None:
            raise DeviceFault(f"the runtime hit a device fault and must be recreated: {self.fault}")
        self.sched.check_fits(req)
        with self._lock:
            if self._stop:  # checked under the lock the loop drains under: no request can slip past the drain
                raise RuntimeError("the runtime is closed: create a new omni_rt.Runtime")
            if req.request_id in self.requests:
                raise ValueError(f"request id {req.request_id!r} is already in flight")
            n = next(self._ids)
            req.thinker.seq_id = n
            if req.talker is not None:
                req.talker.seq_id = _TALKER_SEQ_BASE + n
            self.requests[req.request_id] = req
            self.sched.waiting.append(req)
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

    def stats(self) -> dict:
        """The engine's accounting (cheap and thread-safe: a few counters read under the engine's lock)."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        th, tk = self.stages.thinker_pool, self.stages.talker_pool
        return {"kv_free_blocks": th.num_free_blocks(), "kv_total_blocks": th.num_blocks,
                "talker_kv_free_blocks": tk.num_free_blocks() if tk else 0,
                "talker_kv_total_blocks": tk.num_blocks if tk else 0,
                "speech_slots_free": len(self.sched.free_slots) if tk else 0,
                "speech_slots_total": self.cfg.max_batch_size if tk else 0,
                "running": len(self.sched.running), "waiting": len(self.sched.waiting),
                "warmup_s": round(self.warmup_s, 3),
                "fault": None if self.fault is None else f"{type(self.fault).__name__}: {self.fault}"}

    # -------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.sched.waiting and not self.sched.running:
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except BaseException as e:  # a device fault: sticky, fails everything in flight
                self._fail_all(e)
        closed = RuntimeError("the runtime was closed before this request finished")
        with self._lock:
            running, waiting = list(self.sched.running), list(self.sched.waiting)
            self.sched.waiting.clear()
            self.requests.clear()
        for req in running:  # return their KV blocks and speech slots, so the final stats show them free
            try:
                self._release(req)
            except Exception:  # noqa: BLE001 - a faulted engine's bookkeeping may be gone; the streams still end
                pass
        self.sched.running.clear()
        for req in running + waiting:
            req.out.put(StreamChunk(req.request_id, finished=True, error=closed))

    @torch.inference_mode()
    def step(self) -> None:
        self._reap_cancelled()
        with self.timer("admit"):
            for req in self.sched.admit():
                self._guard(req, self._prepare, req)
        plan, budget = self.sched.thinker_prefill(self.cfg.max_prefill_tokens)
        if plan:
            with self.timer("thinker_prefill"):
                self._transaction(self._prefill_phase, [r for r, _ in plan], dict((id(r), n) for r, n in plan))
        for r in self.sched.running:
            if r.talker is not None and r.talker.embeds is None and self.sched.talker_prompt_ready(r):
                self._guard(r, lambda r=r: self._set_talker_prompt(r))
        talker_plan = self.sched.talker_prefill(budget) if self.stages.talker_pool is not None else []
        speech = self.sched.talker_decode() if self.stages.talker_pool is not None else []
        flush = self.sched.flush() if self.stages.talker_pool is not None else []
        decode = self.sched.thinker_decode()
        reqs = list({id(r): r for r in [r for r, _ in talker_plan] + speech + flush + decode}.values())
        if reqs:
            with self.timer("step"):
                self._transaction(self._main_phase, reqs,
                                  (dict((id(r), n) for r, n in talker_plan), {id(r) for r in speech},
                                   {id(r) for r in flush}, {id(r) for r in decode}))
        self._retire()

    @staticmethod
    def _set_talker_prompt(r: Request) -> None:
        r.talker.set_prompt(*r.talker.feed.prefill())
        r.talker.rope_delta = r.talker.feed.rope_delta   # TM-RoPE talker prompts (images/video in the user turns)

    # ------------------------------------------------------------------------------------- transactions
    def _transaction(self, phase, reqs: list[Request], plan) -> None:
        """Run ``phase(reqs, plan)`` → commit; on a request-attributable failure roll the KV back and retry
        each request alone, failing only those that fail again."""
        try:
            commit = self._attempt(phase, reqs, plan)
        except Exception as e:
            if is_device_fault(e):
                raise
            if len(reqs) == 1:
                self._fail(reqs[0], e)
                return
            for r in reqs:
                self._guard(r, lambda r=r: self._attempt(phase, [r], plan)())
            return
        commit()  # host bookkeeping and device writes of a step that succeeded: never retried

    def _attempt(self, phase, reqs: list[Request], plan):
        pools = (("thinker", self.stages.thinker_pool), ("talker", self.stages.talker_pool))
        marks = [(pool, seq.seq_id, pool.num_tokens(seq.seq_id) if pool.has_seq(seq.seq_id) else None)
                 for r in reqs for name, pool in pools if pool is not None
                 for seq in [r.thinker if name == "thinker" else r.talker] if seq is not None]
        try:
            commit = phase(reqs, plan)
        except BaseException:
            for pool, sid, n in marks:  # undo this attempt's KV appends (their page contents are rewritten later)
                if n is None and pool.has_seq(sid):
                    pool.free(sid)
                elif n is not None and pool.has_seq(sid) and pool.num_tokens(sid) > n:
                    pool.truncate(sid, n)
            raise
        return commit

    def _guard(self, req: Request, fn, *args) -> None:
        """Run one request's own work; a failure that is not a device fault fails that request alone."""
        try:
            fn(*args)
        except Exception as e:
            if is_device_fault(e):
                raise
            self._fail(req, e)

    # -------------------------------------------------------------------------------------------- phases
    def _prepare(self, req: Request) -> None:
        """Encode the request's audios, images and videos and embed its prompt (host-checked, per request)."""
        seq, th = req.thinker, self.model.cfg.thinker
        ids = seq.prompt_ids
        if max(ids) >= self.vocab:
            raise ValueError(f"token id {max(ids)} is outside the vocabulary ({self.vocab})")
        with self.timer("audio_encode"):
            audio, counts = self.stages.audio_encode(req)
        ids_t = to_device(ids, torch.long, self.device)
        image = video = None
        if req.vision:
            with self.timer("vision_encode"):
                positions, seq.rope_delta, image, video, req.deepstack = self.stages.vision_encode(req, ids_t, counts)
        else:
            if any(t in (th.image_token_id, th.video_token_id) for t in ids):
                raise ValueError("the prompt has <|image_pad|> / <|video_pad|> tokens but no image or video was "
                                 "given")
            positions = text_positions(0, len(ids), self.device)
        seq.set_prompt(self.model.thinker.embed(ids_t, audio, image, video), positions)

    def _prefill_phase(self, reqs: list[Request], counts: dict):
        n = [counts[id(r)] for r in reqs]
        tap = self.tap_layer if any(r.speaking for r in reqs) else None
        ids, taps = self.stages.thinker_prefill(reqs, n, tap)
        host = readback(self.device, {"ids": ids})

        def commit():
            done = []
            for r, k, t in zip(reqs, n, taps):
                r.thinker.prefilled += k
                if r.speaking and t is not None:
                    r.taps.append(t)
                if r.thinker.prefilled == r.thinker.prompt_len:
                    done.append(r)
                    r.deepstack = None
                    if not r.speaking:
                        r.thinker.embeds = None
            for r, tok in zip(done, host.get("ids", [])):
                self._guard(r, self._push_token, r, int(tok))
        return commit

    def _main_phase(self, reqs: list[Request], plan):
        talker_counts, speech, flush, decode = plan
        st = self.stages
        out: dict[str, torch.Tensor] = {}
        # 1. talker prefill chunks; a completed prompt gives the first code 0 in this step's frame
        pre = [r for r in reqs if id(r) in talker_counts]
        first, hidden = [], []
        if pre:
            last = st.talker_prefill(pre, [talker_counts[id(r)] for r in pre])
            for r, h in zip(pre, last):
                if r.talker.prefilled + talker_counts[id(r)] == r.talker.prompt_len:
                    first.append(r)
                    hidden.append(h[None])
        # 2. the speech frame: talker decode → code 0 → code-predictor frame → Code2Wav. Steady-state rows (one
        #    new frame each, nothing held back) replay one graph per batch bucket; first frames run eagerly.
        dec = [r for r in reqs if id(r) in speech]
        # (the graph's code-0 draw covers 1 <= top_k <= sampling.CANDIDATES; other talker top_k run eagerly)
        graphed = (st.speech_graph is not None and bool(dec)
                   and all(not r.held and (r.vocoded or self.cfg.first_chunk_frames == 1) for r in dec)
                   and params_within_cap([r.talker.params for r in dec]))
        parts, c2w = [], []
        if graphed:
            if first:
                parts.append(self._eager_frame(first, torch.cat(hidden), c2w))
            parts.append(self._graph_frame(dec, c2w))
        else:
            if dec:
                hidden.append(st.talker_decode(dec, to_device([r.slot for r in dec], torch.long, self.device)))
            if first or dec:
                parts.append(self._eager_frame(first + dec, torch.cat(hidden), c2w))
        rows = [r for p in parts for r in p[0]]
        framed = [r for p in parts for r in p[2]]
        next_embed = None
        if rows:
            out["code0"] = torch.cat([p[1] for p in parts])
        if framed:
            out["frames"] = torch.cat([p[3] for p in parts if p[2]])
            next_embed = torch.cat([p[4] for p in parts if p[2]])
        for members, codes in self._vocode_groups([], None, [r for r in reqs if id(r) in flush]):
            audio, state = st.code2wav_step(members, codes, to_device([r.slot for r in members], torch.long,
                                                                      self.device))
            c2w.append((members, codes, audio, state))
        for g, (_, codes, audio, _) in enumerate(c2w):
            out[f"audio{g}"], out[f"codes{g}"] = audio, codes
        # 3. the thinker decode step (after the speech frame: a first packet never waits for it)
        th = [r for r in reqs if id(r) in decode]
        if th:
            out["next_ids"] = st.thinker_decode(th)
        host = readback(self.device, out)

        def commit():
            self._commit_speech(pre, talker_counts, rows, framed, next_embed,
                                [(m, state) for m, _, _, state in c2w], host)
            for r, tok in zip(th, host.get("next_ids", [])):
                self._guard(r, self._push_token, r, int(tok))
        return commit

    def _framed(self, rows: list[Request]) -> list[int]:
        """Rows whose new code 0 gets residual codes: all but the last allowed (T talker steps → T − 1 frames)."""
        return [i for i, r in enumerate(rows) if len(r.talker.output) + 1 < r.talker.params.max_new_tokens]

    def _eager_frame(self, rows: list[Request], hidden: torch.Tensor, c2w: list):
        """Code 0, residual codes and Code2Wav for rows whose talker hidden states are known (eager)."""
        st = self.stages
        # code 0 belongs to the talker step that made its hidden state: the per-token stage once any row decoded
        with census_stage("talker_decode" if any(r.talker.output for r in rows) else "talker_prefill"):
            code0 = st.sample_code0(rows, hidden, to_device([r.slot for r in rows], torch.long, self.device))
        keep = self._framed(rows)
        framed, frames, nxt = [rows[i] for i in keep], None, None
        if framed:
            idx = to_device(keep, torch.long, self.device)
            frames, nxt = st.code_predictor_frame(framed, hidden.index_select(0, idx), code0.index_select(0, idx))
            vocode = [(j, r) for j, r in enumerate(framed)
                      if r.vocoded or len(r.held) + 1 >= self.cfg.first_chunk_frames]
            for members, codes in self._vocode_groups(vocode, frames, []):
                audio, state = st.code2wav_step(members, codes, to_device([r.slot for r in members], torch.long,
                                                                          self.device))
                c2w.append((members, codes, audio, state))
        return rows, code0, framed, frames, nxt

    def _graph_frame(self, rows: list[Request], c2w: list):
        """The whole speech frame of steady-state rows as one graph replay (``stages.speech_frame``)."""
        res = self.stages.speech_frame(rows)
        keep = self._framed(rows)
        framed, frames, nxt = [rows[i] for i in keep], None, None
        if framed:
            idx = to_device(keep, torch.long, self.device)
            frames, nxt = res["frames"].index_select(0, idx), res["next_embed"].index_select(0, idx)
            c2w.append((framed, frames[:, :, None], res["audio"].index_select(0, idx), res["state"].select(idx)))
        return rows, res["code0"], framed, frames, nxt

    def _vocode_groups(self, vocode, frames, flush):
        """Code2Wav batches: requests with the same number of new frames (held ones + this step's) stream
        together → [(members, codes (B, G, n))]."""
        by_n: dict[int, list] = {}
        for j, r in vocode:
            by_n.setdefault(len(r.held) + 1, []).append((r, j))
        for r in flush:
            by_n.setdefault(len(r.held), []).append((r, None))
        groups = []
        for n, items in by_n.items():
            codes = []
            for r, j in items:
                parts = [to_device(np.stack(r.held, axis=1), torch.long, self.device)] if r.held else []
                if j is not None:
                    parts.append(frames[j][:, None])
                codes.append(torch.cat(parts, dim=1))
            groups.append(([r for r, _ in items], torch.stack(codes)))
        return groups

    def _commit_speech(self, pre, talker_counts, rows, framed, next_embed, c2w, host) -> None:
        st = self.stages
        for r in pre:
            r.talker.prefilled += talker_counts[id(r)]
            if r.talker.prefilled == r.talker.prompt_len:
                r.talker.embeds = None
        code0 = host.get("code0", [])
        stop = {id(r): int(c) in r.talker.stop_ids for r, c in zip(rows, code0)}
        if rows:
            st.seen.index_put_((to_device([r.slot for r in rows], torch.long, self.device),
                                to_device(code0, torch.long, self.device)), st.seen.new_ones(()))
        kept = [j for j, r in enumerate(framed) if not stop[id(r)]]
        if kept:
            st.codec_embed.index_copy_(0, to_device([framed[j].slot for j in kept], torch.long, self.device),
                                       next_embed.index_select(0, to_device(kept, torch.long, self.device)))
        frames = host.get("frames")
        new_frame = {id(framed[j]): frames[j] for j in kept}
        vocoded = set()
        for g, (members, state) in enumerate(c2w):
            audio, codes = host[f"audio{g}"], host[f"codes{g}"]
            ok = [i for i, r in enumerate(members) if not stop.get(id(r), False)]
            if not ok:
                continue
            st.c2w_state.scatter_(to_device([members[i].slot for i in ok], torch.long, self.device),
                                  state.select(to_device(ok, torch.long, self.device)))
            for i in ok:
                r = members[i]
                pcm = audio[i] if r.vocoded else audio[i][self.model.code2wav.delay:]
                r.codes.append(codes[i])
                r.vocoded += codes[i].shape[1]
                r.held = []
                vocoded.add(id(r))
                self._emit_audio(r, np.ascontiguousarray(pcm, dtype=np.float32))
        for r, c in zip(rows, code0):
            r.talker.push(int(c))
            if id(r) in new_frame and id(r) not in vocoded:
                r.held.append(new_frame[id(r)])
            if r.talker.finished:
                self.sched.free_seq("talker", r.talker)

    def _push_token(self, req: Request, token: int) -> None:
        """Commit one thinker token: stop/length rule and stop strings, the talker's recipe, the text delta."""
        seq = req.thinker
        first = not seq.output
        seq.push(token)
        if req.text_out is None:   # plain detokenizing: every id is settled at once
            step = TextStep(text=req.detok.push([token]), release=[token], finished=seq.finished)
        else:
            step = req.text_out.push(token, final=seq.finished)
            if step.stopped and seq.finish_reason is None:
                seq.finish_reason = "stop"   # a stop string: the thinker ends here
        now = time.perf_counter()
        if first:
            req.t_first_token = now
        if seq.finished:
            req.t_thinker_done = now
            self.sched.free_seq("thinker", seq)
        if req.speaking and not req.talker.finished and (step.release or step.finished):
            if req.talker.feed is None:
                taps = torch.cat(req.taps) if req.taps else None
                if taps is None or taps.shape[0] != seq.prompt_len:
                    raise RuntimeError("the thinker's accept-layer hidden states were not captured for every "
                                       "prompt position")
                req.talker.feed = TalkerTextFeed(self.model, seq.prompt_ids, seq.embeds, taps, req.speaker_id,
                                                 seq.stop_ids, seq.params.max_new_tokens,
                                                 vision=[v.item for v in req.vision])
                req.taps, seq.embeds = [], None
            req.talker.feed.push(step.release, step.finished)
            if not req.talker.started and req.talker.feed.silent:
                req.talker.finish_reason = "silent"  # a one-token answer: nothing for the talker to voice
                self.sched.free_seq("talker", req.talker)
        req.out.put(StreamChunk(req.request_id, text_delta=step.text, token_ids=[token],
                                reasoning_delta=step.reasoning))

    def _emit_audio(self, req: Request, pcm: np.ndarray) -> None:
        if pcm.size:
            if req.t_first_audio is None:
                req.t_first_audio = time.perf_counter()
            req.audio_samples += pcm.size
            req.out.put(StreamChunk(req.request_id, audio=pcm))

    # ------------------------------------------------------------------------------------------ retire
    def _release(self, req: Request) -> None:
        if req.slot >= 0 and self.stages.talker_pool is not None:
            slot = to_device([req.slot], torch.long, self.device)
            self.stages.c2w_state.scatter_(slot, self.stages.fresh_c2w)
            self.stages.seen[req.slot] = False
        self.sched.release(req)
        with self._lock:
            self.requests.pop(req.request_id, None)

    def _retire(self) -> None:
        for req in list(self.sched.running):
            if req.done:
                tail = req.detok.push([], final=True) if req.text_out is None else ""
                self._release(req)
                req.out.put(StreamChunk(req.request_id, text_delta=tail, finished=True, metrics=req.metrics()))

    def _reap_cancelled(self) -> None:
        for req in [r for r in self.sched.running if r.cancelled]:
            self._release(req)
            req.out.put(StreamChunk(req.request_id, finished=True, metrics=req.metrics(),
                                    error=CancelledRequest(f"request {req.request_id} was aborted")))
        with self._lock:
            for req in [r for r in self.sched.waiting if r.cancelled]:
                self.sched.waiting.remove(req)
                self.requests.pop(req.request_id, None)
                req.out.put(StreamChunk(req.request_id, finished=True,
                                        error=CancelledRequest(f"request {req.request_id} was aborted")))

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.error is not None:
            return
        req.error = error
        self._release(req)
        req.out.put(StreamChunk(req.request_id, finished=True, error=error))

    def _fail_all(self, error: BaseException) -> None:
        self.fault = error
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        fault = DeviceFault(f"engine step failed ({detail}); every request in flight was failed and the "
                            f"runtime must be recreated")
        fault.__cause__ = error
        for req in list(self.sched.running) + list(self.sched.waiting):
            req.out.put(StreamChunk(req.request_id, finished=True, error=fault))
        self.sched.running.clear()
        self.sched.waiting.clear()
        with self._lock:
            self.requests.clear()
            self._stop = True

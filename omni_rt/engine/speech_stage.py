"""The engine's speech stage: talker prefill/decode, the code-predictor frame loop and streaming Code2Wav,
batched across every speaking request, with all per-request state in slot-indexed pools.

Per engine step, for the speaking requests:
1. one talker decode step for each request whose last frame is done and whose trailing-text entry is known
   (a request whose next thinker token is not out yet waits — it never gets tts_pad instead);
2. the talker prefill (and first code 0) for requests whose thinker has produced its first token;
3. one batched code-predictor frame for every request with a new code 0;
4. one batched streaming Code2Wav step over the new frames: each request's decoder state lives in a slot of one
   ``Code2WavState`` pool, gathered for the step and scattered back.
So a new request's first audio packet leaves in the same engine step as its talker prefill, after exactly
``first_chunk_frames`` frames (default 1).
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..profiling import census_stage
from .kv_cache import KVCachePool
from .model_runner import DecoderRunner
from .graphs import code2wav_graphs, code_predictor_graphs, state_from, state_names
from .requests import EngineRequest
from .speech import (TalkerRequest, TalkerTextFeed, code_predictor_step, new_talker_request, talker_decode_step,
                     talker_first_code)

_TALKER_SEQ_BASE = 1 << 40  # talker KV sequence ids live apart from the thinker's


def _state_inputs(state) -> dict:
    """A Code2WavState as the graph runner's named inputs."""
    return dict(zip(state_names(state), state.tensors()))


def _capture_or_none(build):
    """Build and capture a graph runner; on failure warn and return None (eager fallback)."""
    try:
        runner = build()
        runner.capture()
        return runner
    except Exception as e:  # noqa: BLE001 - a capture problem must not take the runtime down
        warnings.warn(f"CUDA-graph capture failed ({e!r}); running that step eagerly", RuntimeWarning,
                      stacklevel=2)
        return None


def code2wav_step(c2w, pool_state, graph, codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One streaming Code2Wav step for the streams in slots ``idx`` of ``pool_state`` (a ``Code2WavState`` pool,
    updated in place): codes (B, G, n) -> audio (B, n·samples_per_frame) on the device. One-frame steps replay
    ``graph`` (a ``code2wav_graphs`` runner) when given."""
    n = codes.shape[-1]
    with census_stage("code2wav_step"):
        state = pool_state.select(idx)
        if n == 1 and graph is not None:
            res = graph.run(codes.shape[0], {"codes": codes, **_state_inputs(state)})
            # outputs are views of static buffers: scatter_ copies the state out before the next replay
            audio, state = res["audio"], state_from(res, len(state.conv), len(state.tail), prefix="new_")
        else:
            audio, state = c2w.step_padded(codes, state)
        pool_state.scatter_(idx, state)
        return audio.float()


@dataclasses.dataclass
class _Speaker:
    """Speech state of one request: its talker progress, its Code2Wav slot, how many frames were vocoded."""

    slot: int
    reserved_blocks: int
    talker: TalkerRequest | None = None
    vocoded: int = 0
    done: bool = False
    prefill: tuple | None = None   # (embeds (n, H), positions (3, n)) while the talker prompt is being run
    prefilled: int = 0


class SpeechStage:
    def __init__(self, engine, first_chunk_frames: int = 1):
        model = engine.model
        self.engine, self.model = engine, model
        self.cfg = model.cfg
        self.device, self.dtype = engine.device, engine.dtype
        self.first_chunk_frames = first_chunk_frames
        kc = self.cfg.talker.text
        pool = engine.pool
        self.pool = KVCachePool(kc.num_hidden_layers, pool.num_blocks, pool.block_size, kc.num_key_value_heads,
                                kc.head_dim, self.dtype, self.device)
        self.runner = DecoderRunner(model.talker.forward, self.pool, engine.max_prefill_tokens)
        self.slots = list(range(engine.max_batch_size))[::-1]
        self.c2w = model.code2wav
        self.c2w_state = self.c2w.init_state(engine.max_batch_size, self.device, self.dtype)
        self._fresh = self.c2w.init_state(1, self.device, self.dtype)
        self._workspaces: dict[int, object] = {}
        self.state: dict[str, _Speaker] = {}
        # With CUDA graphs on: the code predictor's 15-step frame loop (launch-bound, ~750 kernels per frame
        # eagerly) replays as one graph per batch bucket, sampling included, and so does every one-frame
        # Code2Wav streaming step.
        self.frame_graph = self.c2w_graph = None
        if getattr(engine, "cuda_graphs", False) and torch.device(self.device).type == "cuda":
            self.frame_graph = _capture_or_none(lambda: code_predictor_graphs(
                model.talker.code_predictor, engine.max_batch_size, self.device, self.dtype))
            self.c2w_graph = _capture_or_none(lambda: code2wav_graphs(self.c2w, engine.max_batch_size, frames=1))

    # -------------------------------------------------------------------------------------- admission
    def _talker_tokens(self, req: EngineRequest) -> int:
        # user turns + 9 assistant positions bound the prefill; each talker step adds one position.
        return len(req.prompt) + 9 + req.talker_params.max_new_tokens

    def check_fits(self, req: EngineRequest) -> None:
        need = self.pool.manager.blocks_for_tokens(self._talker_tokens(req))
        if need > self.pool.num_blocks:
            raise ValueError(f"the talker needs {need} KV blocks for this request but its pool has "
                             f"{self.pool.num_blocks}; lower talker max_new_tokens or raise the KV memory")

    def _outstanding(self) -> int:
        """Talker blocks promised to admitted requests but not allocated yet."""
        total = 0
        for sp in self.state.values():
            if sp.talker is not None and sp.talker.finished:
                continue
            sid = sp.talker.seq_id if sp.talker is not None else None
            held = (self.pool.manager.blocks_for_tokens(self.pool.num_tokens(sid))
                    if sid is not None and self.pool.has_seq(sid) else 0)
            total += max(0, sp.reserved_blocks - held)
        return total

    def can_admit(self, req: EngineRequest) -> bool:
        need = self.pool.manager.blocks_for_tokens(self._talker_tokens(req))
        return bool(self.slots) and need <= self.pool.num_free_blocks() - self._outstanding()

    def admit(self, req: EngineRequest) -> None:
        slot = self.slots.pop()
        self.c2w_state.scatter_(torch.tensor([slot], device=self.device), self._fresh)
        self.state[req.request_id] = _Speaker(slot, self.pool.manager.blocks_for_tokens(self._talker_tokens(req)))

    def on_token(self, req: EngineRequest, tokens: list[int], finished: bool) -> None:
        """Called with thinker tokens as they settle (in order; ``finished`` with the last one); the first call
        builds the talker's text feed from the prompt taps."""
        sp = self.state[req.request_id]
        if sp.talker is None:
            taps = torch.cat(req.prompt_taps) if req.prompt_taps else None
            if taps is None or taps.shape[0] != len(req.prompt):
                raise RuntimeError("the thinker's accept-layer hidden states were not captured for every prompt "
                                   "position")
            feed = TalkerTextFeed(self.model, req.prompt, req.embeds, taps, req.speaker_id, req.thinker_stop_ids,
                                  req.thinker_params.max_new_tokens, vision=[v.item for v in req.vision])
            p = dataclasses.replace(req.talker_params, seed=req.talker_seed)
            sp.talker = new_talker_request(_TALKER_SEQ_BASE + req.seq_id, feed, p)
            req.prompt_taps = []   # the feed keeps only the projected user turns
            req.embeds = None
        sp.talker.feed.push(tokens, finished)

    # ------------------------------------------------------------------------------------------ step
    def active(self, req: EngineRequest) -> bool:
        sp = self.state.get(req.request_id)
        return sp is not None and sp.talker is not None and not sp.done

    def finished(self, req: EngineRequest) -> bool:
        sp = self.state.get(req.request_id)
        return sp is None or sp.done

    def _workspace(self, batch: int):
        ws = self._workspaces.get(batch)
        if ws is None:
            ws = self._workspaces[batch] = self.model.talker.code_predictor.workspace(batch, self.device, self.dtype)
        return ws

    def step(self, reqs: list[EngineRequest]) -> list[tuple[EngineRequest, np.ndarray]]:
        speakers = [(r, self.state[r.request_id]) for r in reqs]
        trs = [sp.talker for _, sp in speakers]
        with self.engine.timer("talker_decode"):
            talker_decode_step(self.model, self.runner, [t for t in trs if t.started])
        for r, sp in speakers:
            if not sp.talker.started and sp.talker.feed.silent:
                sp.talker.finish_reason = "silent"  # a one-token answer: nothing for the talker to voice
        with self.engine.timer("talker_prefill"):
            self._prefill_step([sp for _, sp in speakers])
        need = [t for t in trs if t.needs_frame()]
        if need:
            with self.engine.timer("code_predictor"):
                code_predictor_step(self.model, need, self._workspace(len(need)), self.frame_graph)
        out = self._vocode(speakers)
        for r, sp in speakers:
            t = sp.talker
            if t.finished and sp.vocoded == len(t.frames):
                sp.done = True
                if self.pool.has_seq(t.seq_id):
                    self.pool.free(t.seq_id)
        return out

    def _prefill_step(self, speakers: list[_Speaker]) -> None:
        """Advance talker prompts by at most ``max_prefill_tokens`` tokens this step (a long audio prompt's
        talker prefill is spread over steps, so requests that are already speaking keep streaming)."""
        for sp in speakers:
            t = sp.talker
            if sp.prefill is None and not t.started and not t.finished and t.feed.prefill_ready():
                sp.prefill = t.feed.prefill()
        todo = [sp for sp in speakers if sp.prefill is not None]
        if not todo:
            return
        budget = self.engine.max_prefill_tokens
        batch, chunks, positions = [], [], []
        for sp in todo:
            embeds, pos = sp.prefill
            n = min(embeds.shape[0] - sp.prefilled, budget)
            if n <= 0:
                break
            budget -= n
            batch.append(sp)
            chunks.append(embeds[sp.prefilled: sp.prefilled + n])
            positions.append(pos[:, sp.prefilled: sp.prefilled + n])
        with census_stage("talker_prefill"):
            hidden, _ = self.runner.prefill([sp.talker.seq_id for sp in batch], chunks, positions)
        done, last = [], []
        for sp, h, c in zip(batch, hidden, chunks):
            sp.prefilled += c.shape[0]
            if sp.prefilled == sp.prefill[0].shape[0]:
                done.append(sp)
                last.append(h[-1])
                sp.prefill = None
        if done:
            with census_stage("talker_prefill"):
                talker_first_code(self.model, self.runner, [sp.talker for sp in done], torch.stack(last))

    def _vocode(self, speakers) -> list[tuple[EngineRequest, np.ndarray]]:
        """Stream every new frame through Code2Wav, batching requests with the same number of new frames."""
        groups: dict[int, list] = {}
        for r, sp in speakers:
            t = sp.talker
            n = len(t.frames) - sp.vocoded
            if n <= 0:
                continue
            if sp.vocoded == 0 and n < self.first_chunk_frames and not t.finished:
                continue  # hold the first packet until first_chunk_frames frames exist
            groups.setdefault(n, []).append((r, sp))
        out = []
        for n, members in groups.items():
            with self.engine.timer("code2wav"):
                codes = torch.stack([torch.stack(sp.talker.frames[sp.vocoded: sp.vocoded + n], dim=1)
                                     for _, sp in members])            # (B, G, n)
                idx = torch.tensor([sp.slot for _, sp in members], device=self.device)
                audio = code2wav_step(self.c2w, self.c2w_state, self.c2w_graph, codes, idx)
                audio = audio.float().cpu().numpy()
                codes_np = codes.cpu().numpy()
            for j, (r, sp) in enumerate(members):
                pcm = audio[j]
                if sp.vocoded == 0:
                    pcm = pcm[self.c2w.delay:]  # samples before the waveform's start
                sp.vocoded += n
                r.frames += n
                r.codes.append(codes_np[j])
                out.append((r, np.ascontiguousarray(pcm, dtype=np.float32)))
        return out

    def release(self, req: EngineRequest) -> None:
        sp = self.state.pop(req.request_id, None)
        if sp is None:
            return
        if sp.talker is not None and self.pool.has_seq(sp.talker.seq_id):
            self.pool.free(sp.talker.seq_id)
        self.slots.append(sp.slot)

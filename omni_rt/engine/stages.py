"""The engine's stage callables, one clearly named method per stage, and the device state they work on.

Stages: ``audio_encode``, ``thinker_prefill``, ``thinker_decode``, ``talker_prefill``, ``talker_decode``,
``code_predictor_frame``, ``code2wav_step`` and ``readback``. Each takes the requests it works for first (so a
fault can be attributed and a profiler can wrap it) and returns device tensors; none changes a request or
commits device state — the engine does that once the whole step succeeded, so a failed step can be rolled
back and retried for the requests that did not cause it.

Per-request speech state lives on the device in slot-indexed pools (``slot`` = the request's speech slot):
the Code2Wav streaming state, the talker's next codec input (the sum of the last frame's code embeddings)
and the code-0 ids seen so far (repetition penalty).
"""
from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import torch

from .. import audio as audio_mod
from ..sampling import SamplingTensors, sample, to_device
from ..models.code_predictor import FrameSampling
from ..models.mrope import multimodal_positions
from ..profiling import census_stage
from .config import EngineConfig
from .graphs import (PREFILL_GRAPH_TOKENS, PrefillGraphs, ThinkerDecodeGraphs, code2wav_graphs, code_predictor_graphs,
                     speech_frame_graphs, state_from, state_names)
from .kv_cache import KVCachePool
from .model_runner import DecoderRunner
from .sequence import Request, Sequence


logger = logging.getLogger(__name__)


def _capture_or_none(name: str, build):
    """Build and capture a graph runner; on failure warn loudly and return None (that stage runs eagerly)."""
    try:
        runner = build()
        runner.capture()
        return runner
    except Exception as e:  # noqa: BLE001 - a capture problem must not take the runtime down
        warnings.warn(f"CUDA-graph capture of {name} failed ({e!r}); that stage runs EAGERLY", RuntimeWarning,
                      stacklevel=3)
        return None


def readback(device: torch.device, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every tensor the step produced, back on the host after ONE synchronisation: packed into one byte
    buffer on the device, copied into pinned memory with ``non_blocking=True``, one event waited on."""
    named = [(k, t.detach().contiguous()) for k, t in tensors.items() if t is not None]
    if not named:
        return {}
    flat = torch.cat([t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
                      for _, t in named])
    if device.type == "cuda":
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        flat = host
    raw = flat.numpy()  # the step's one read-back
    out, offset = {}, 0
    for k, t in named:
        n = t.numel() * t.element_size()
        dtype = {torch.int64: np.int64, torch.float32: np.float32, torch.int32: np.int32, torch.bool: np.bool_,
                 torch.float16: np.float16}[t.dtype]
        out[k] = raw[offset: offset + n].view(dtype).reshape(tuple(t.shape))
        offset += n
    return out


class Stages:
    def __init__(self, model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.model, self.cfg, self.device, self.dtype = model, cfg, torch.device(device), dtype
        tc = model.cfg.thinker.text
        self.thinker_pool = KVCachePool(tc.num_hidden_layers, cfg.kv_blocks, cfg.kv_block_size,
                                        tc.num_key_value_heads, tc.head_dim, dtype, device)
        self.thinker_runner = self.decoder_runner("thinker", self.thinker_pool)
        graphs = cfg.cuda_graphs and self.device.type == "cuda"
        # start-up warm-up: every runner's buckets run once (Triton JIT), then are captured when graphs are on
        t0 = time.perf_counter()
        self.decode_graphs = None
        if graphs:
            self.decode_graphs = _capture_or_none("thinker_decode", lambda: ThinkerDecodeGraphs(
                model.thinker, self.thinker_pool, cfg.max_batch_size, cfg.max_model_len))
        self.talker_pool = self.talker_runner = None
        self.frame_graph = self.c2w_graph = self.speech_graph = None
        if model.has_talker:
            kc = model.cfg.talker.text
            self.talker_pool = KVCachePool(kc.num_hidden_layers, cfg.kv_blocks, cfg.kv_block_size,
                                           kc.num_key_value_heads, kc.head_dim, dtype, device)
            self.talker_runner = self.decoder_runner("talker", self.talker_pool)
            S = cfg.max_batch_size   # slot pools have one more row: the scratch slot of graph padding rows
            self.c2w_state = model.code2wav.init_state(S + 1, device, dtype)
            self.fresh_c2w = model.code2wav.init_state(1, device, dtype)
            self.codec_embed = torch.zeros(S + 1, kc.hidden_size, device=device, dtype=dtype)
            self.seen = torch.zeros(S + 1, kc.vocab_size, dtype=torch.bool, device=device)
            self.suppress = model.talker.suppress_mask(device)
            self._workspaces: dict[int, object] = {}
            if graphs:
                # the code predictor's 15-step frame loop (~750 launches eagerly) and each one-frame Code2Wav
                # step replay as one graph per batch bucket, sampling included
                self.frame_graph = _capture_or_none("code_predictor_frame", lambda: code_predictor_graphs(
                    model.talker.code_predictor, S, device, dtype))
                self.c2w_graph = _capture_or_none("code2wav_step", lambda: code2wav_graphs(
                    model.code2wav, S, frames=1))
                self.speech_graph = _capture_or_none("speech_frame", lambda: self.speech_frame_runner())
        for name, runner in (("thinker_prefill", self.thinker_runner), ("talker_prefill", self.talker_runner)):
            if runner is None or self.device.type != "cuda":   # CPU: no Triton to compile, nothing to warm
                continue
            if not graphs:
                runner.graphs.runner.warm_up()
            elif _capture_or_none(name, lambda: runner.graphs.runner) is None:
                runner.graphs.runner.graphs.clear()   # a partial capture: every bucket runs eagerly
        self.warmup_s = time.perf_counter() - t0
        if self.device.type == "cuda":
            logger.info("warm-up of every batch and prefill bucket in %.1f s; graphs: %s", self.warmup_s,
                        self.graph_report() or "off")

    def graph_report(self) -> dict[str, bool]:
        """Per graphed stage: True when it replays a captured graph, False when it fell back to eager."""
        if not (self.cfg.cuda_graphs and self.device.type == "cuda"):
            return {}
        report = {"thinker_decode": self.decode_graphs is not None,
                  "thinker_prefill": bool(self.thinker_runner.graphs.runner.graphs)}
        if self.model.has_talker:
            report |= {"code_predictor_frame": self.frame_graph is not None, "code2wav_step": self.c2w_graph is not None,
                       "speech_frame": self.speech_graph is not None,
                       "talker_prefill": bool(self.talker_runner.graphs.runner.graphs)}
        return report

    def decoder_runner(self, which: str, pool: KVCachePool) -> DecoderRunner:
        """The thinker's or talker's runner over ``pool``: prefill chunks of up to ``PREFILL_GRAPH_TOKENS``
        tokens run in bucketed token shapes through static buffers (``PrefillGraphs``: replayed on CUDA)."""
        talker = which == "talker"
        decoder = self.model.talker if talker else self.model.thinker
        text = (self.model.cfg.talker if talker else self.model.cfg.thinker).text
        tokens = 2 * self.cfg.max_model_len + 9 if talker else self.cfg.max_model_len   # longest sequence
        max_blocks = min(pool.num_blocks, -(-tokens // self.cfg.kv_block_size))
        tap = None if talker or not self.model.has_talker else self.model.cfg.talker.accept_hidden_layer
        graphs = PrefillGraphs(decoder.forward, pool, self.cfg.max_batch_size, max_blocks, text.hidden_size,
                               self.dtype, tap, min(PREFILL_GRAPH_TOKENS, self.cfg.max_prefill_tokens),
                               name=f"{which}_prefill")
        return DecoderRunner(decoder.forward, pool, self.cfg.max_prefill_tokens, graphs)

    # --------------------------------------------------------------------------------------- thinker
    def audio_encode(self, req: Request) -> tuple[torch.Tensor | None, list[int]]:
        """The request's audios → (AuT features (n_audio_tokens, H), tokens per audio), checked against its
        <|audio_pad|> run."""
        thinker = self.model.thinker
        th = self.model.cfg.thinker
        pads = sum(1 for t in req.thinker.prompt_ids if t == th.audio_token_id)
        if not req.audios:
            if pads:
                raise ValueError("the prompt has <|audio_pad|> tokens but no audio was given")
            return None, []
        mels = [audio_mod.log_mel(a, device=self.device, n_mels=th.audio.num_mel_bins) for a in req.audios]
        lens = [m.shape[1] for m in mels]
        counts = [int(thinker.audio_tower.num_audio_tokens(n)) for n in lens]
        if pads != sum(counts):
            raise ValueError(f"the prompt has {pads} <|audio_pad|> tokens but its audios give {sum(counts)} "
                             f"({counts}); expand each audio's pad run to its token count")
        with census_stage("audio_encode"):
            return thinker.audio_tower(torch.cat(mels, dim=1).to(self.dtype), lens), counts

    def vision_encode(self, req: Request, ids: torch.Tensor, audio_counts: list[int]):
        """The request's images/videos → (TM-RoPE positions (3, n), rope delta, image features, video features,
        deepstack (mask, per-tap features) or None); every pad run is checked against its medium first."""
        thinker, th = self.model.thinker, self.model.cfg.thinker
        refusal = self.model.cfg.vision_refusal()
        if refusal is not None or thinker.visual is None:
            raise ValueError(refusal or "this checkpoint has no vision tower, so it cannot take images or video")
        positions, delta = multimodal_positions(req.thinker.prompt_ids, th, th.vision.spatial_merge_size,
                                                audio_counts, [v.item for v in req.vision])
        with census_stage("vision_encode"):
            feats, taps = thinker.visual.encode([(v.pixel_values, v.item.grid) for v in req.vision], self.dtype)
            image, video, deepstack = _scatter_vision(ids, [v.item.kind for v in req.vision], feats, taps,
                                                      th.image_token_id, th.video_token_id)
            return positions.to(self.device), delta, image, video, deepstack

    def sample_thinker(self, hidden: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """hidden (B, H) → next ids (B,) on the device (penalties over prompt + output when asked)."""
        logits = self.model.thinker.logits(hidden)
        params = [s.params for s in seqs]
        st = SamplingTensors.build(params, [len(s.output) for s in seqs], [s.seed for s in seqs], self.device)
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            rows = [i for i, s in enumerate(seqs) for _ in s.prompt_ids + s.output]
            cols = [t for s in seqs for t in s.prompt_ids + s.output]
            seen = torch.zeros(len(seqs), logits.shape[-1], dtype=torch.bool, device=self.device)
            seen[to_device(rows, torch.long, self.device), to_device(cols, torch.long, self.device)] = True
        return sample(logits, st, seen)

    def thinker_prefill(self, reqs: list[Request], counts: list[int], tap_layer: int | None):
        """Prompt chunks (counts[i] tokens of reqs[i]) through the thinker → (ids (B_done,) sampled for the
        requests whose prompt this completes, per-request taps)."""
        with census_stage("thinker_prefill"):
            return self._thinker_prefill(reqs, counts, tap_layer)

    def _thinker_prefill(self, reqs, counts, tap_layer):
        seqs = [r.thinker for r in reqs]
        chunks = [s.chunk(n) for s, n in zip(seqs, counts)]
        deepstack = [_deepstack_slice(r.deepstack, r.thinker.prefilled, n) for r, n in zip(reqs, counts)]
        hidden, taps = self.thinker_runner.prefill([s.seq_id for s in seqs], [c[0] for c in chunks],
                                                   [c[1] for c in chunks], tap_layer,
                                                   deepstack if any(d is not None for d in deepstack) else None)
        done = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.prefilled + n == s.prompt_len]
        ids = None
        if done:
            ids = self.sample_thinker(torch.stack([hidden[i][-1] for i in done]), [seqs[i] for i in done])
        return ids, taps

    def thinker_decode(self, reqs: list[Request]) -> torch.Tensor:
        """One batched thinker step for requests holding their prompt in the KV → next ids (B,)."""
        with census_stage("thinker_decode"):
            return self._thinker_decode(reqs)

    def _thinker_decode(self, reqs: list[Request]) -> torch.Tensor:
        seqs = [r.thinker for r in reqs]
        if self.decode_graphs is not None:
            params = [s.params for s in seqs]
            seen = ([s.prompt_ids + s.output for s in seqs]
                    if any(p.repetition_penalty != 1.0 for p in params) else None)
            out = self.decode_graphs.decode([s.seq_id for s in seqs], [s.output[-1] for s in seqs],
                                            [s.next_position() for s in seqs], params,
                                            [len(s.output) for s in seqs], [s.seed for s in seqs], seen)
            return out["next_ids"]
        ids = to_device([s.output[-1] for s in seqs], torch.long, self.device)
        pos = to_device([s.next_position() for s in seqs], torch.float32, self.device).expand(3, -1)
        hidden, _ = self.thinker_runner.decode([s.seq_id for s in seqs], self.model.thinker.embed(ids), pos)
        return self.sample_thinker(hidden, seqs)

    # ---------------------------------------------------------------------------------------- speech
    def talker_prefill(self, reqs: list[Request], counts: list[int]) -> list[torch.Tensor]:
        """Talker prompt chunks → per request the post-norm hidden of its chunk's last position (H,)."""
        seqs = [r.talker for r in reqs]
        chunks = [s.chunk(n) for s, n in zip(seqs, counts)]
        with census_stage("talker_prefill"):
            hidden, _ = self.talker_runner.prefill([s.seq_id for s in seqs], [c[0] for c in chunks],
                                                   [c[1] for c in chunks])
            return [h[-1] for h in hidden]

    def talker_decode(self, reqs: list[Request], slots: torch.Tensor) -> torch.Tensor:
        """One talker step: input = last frame's codec embedding sum + the next text entry → hidden (B, H)."""
        seqs = [r.talker for r in reqs]
        with census_stage("talker_decode"):
            entries = torch.stack([r.talker.feed.entry(len(s.output) - 1) for r, s in zip(reqs, seqs)])
            x = self.codec_embed.index_select(0, slots) + entries.to(self.dtype)
            pos = to_device([s.next_position() for s in seqs], torch.float32, self.device).expand(3, -1)
            hidden, _ = self.talker_runner.decode([s.seq_id for s in seqs], x, pos)
            return hidden

    def sample_code0(self, reqs: list[Request], hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Code 0 per row: the talker's head, penalty over its own generated code 0s, suppressed ids."""
        seqs = [r.talker for r in reqs]
        st = SamplingTensors.build([s.params for s in seqs], [len(s.output) for s in seqs],
                                   [s.seed for s in seqs], self.device)
        logits = self.model.talker.logits(hidden)
        return sample(logits, st, self.seen.index_select(0, slots), self.suppress)

    def code_predictor_frame(self, reqs: list[Request], hidden: torch.Tensor, code0: torch.Tensor):
        """Residual codes for each row's new code 0 → (frames (B, G) int64, next codec input (B, H))."""
        with census_stage("code_predictor_frame"):
            return self._code_predictor_frame(reqs, hidden, code0)

    def _code_predictor_frame(self, reqs, hidden, code0):
        talker = self.model.talker
        seqs = [r.talker for r in reqs]
        c0_embed = talker.embed_codec(code0)
        if self.frame_graph is None:
            sampling = FrameSampling.for_talker([s.params.temperature for s in seqs], [s.seed for s in seqs],
                                                [len(s.output) for s in seqs], self.device)
            ws = self._workspaces.get(len(reqs))
            if ws is None:
                ws = self._workspaces[len(reqs)] = talker.code_predictor.workspace(len(reqs), self.device,
                                                                                    self.dtype)
            codes, nxt = talker.code_predictor.frame(hidden, c0_embed, ws, sampling)
        else:
            rows = FrameSampling.host_rows([s.params.temperature for s in seqs], [s.seed for s in seqs],
                                           [len(s.output) for s in seqs])
            out = self.frame_graph.run(len(reqs), {"past_hidden": hidden, "code0_embed": c0_embed} | (rows or {}))
            codes, nxt = out["codes"].clone(), out["next_embed"].clone()  # static outputs: copy before reuse
        return torch.cat((code0[:, None], codes), dim=1), nxt

    def speech_frame_runner(self, use_graphs: bool = True):
        """The steady-state speech frame behind a GraphRunner (block tables wide enough for any talker length)."""
        tokens = self.cfg.max_model_len + 9 + self.cfg.max_model_len  # prompt bound + 9 + generous talker room
        max_blocks = min(self.talker_pool.num_blocks, -(-tokens // self.cfg.kv_block_size))
        return speech_frame_graphs(self.model, self.talker_pool, self, self.cfg.max_batch_size, max_blocks,
                                   use_graphs=use_graphs)

    def speech_frame(self, reqs: list[Request]) -> dict:
        """One speech frame for steady-state rows (each consumes its next text entry and vocodes one frame)
        through ``speech_graph`` → code0 (B,), frames (B, G), next_embed (B, H), audio (B, T), state (new).
        The eager work around the replay (input fills, copies out) is costed as ``talker_decode``."""
        with census_stage("talker_decode"):
            return self._speech_frame(reqs)

    def _speech_frame(self, reqs: list[Request]) -> dict:
        seqs = [r.talker for r in reqs]
        ids = [s.seq_id for s in seqs]
        entries = torch.stack([r.talker.feed.entry(len(s.output) - 1) for r, s in zip(reqs, seqs)]).to(self.dtype)
        pool = self.talker_pool
        cp = FrameSampling.host_rows([s.params.temperature for s in seqs], [s.seed for s in seqs],
                                     [len(s.output) for s in seqs])
        values = {   # host data but the entries: staged and copied once (GraphRunner.host_inputs)
            "slots": [r.slot for r in reqs], "entries": entries, "positions": [s.next_position() for s in seqs],
            "slot_mapping": pool.append_token(ids, out=np.empty(len(ids), dtype=np.int64)),
            "block_tables": lambda buf: pool.block_tables(ids, out=buf),
            "context_lens": lambda buf: pool.context_lens(ids, out=buf),
            "temperature": [s.params.temperature for s in seqs], "top_p": [s.params.top_p for s in seqs],
            "repetition_penalty": [s.params.repetition_penalty for s in seqs],
            "top_k": [s.params.top_k or 0 for s in seqs], "seeds": [s.seed for s in seqs],
            "steps": [len(s.output) for s in seqs],
        } | {f"cp_{k}" if k != "frame_index" else k: v for k, v in (cp or {}).items()}
        res = self.speech_graph.run(len(reqs), values)
        # Views of the static outputs, valid until the next replay: the engine copies what it keeps (index_select,
        # cat) in the same step, before any other replay of this graph.
        state = state_from(res, self.c2w_state.layout, prefix="new_")
        return {"code0": res["code0"], "frames": res["frames"], "next_embed": res["next_embed"],
                "audio": res["audio"], "state": state}

    def code2wav_step(self, reqs: list[Request], codes: torch.Tensor, slots: torch.Tensor):
        """codes (B, G, n) more frames for each request's stream → (audio (B, n·T) float32, new state)."""
        with census_stage("code2wav_step"):
            return self._code2wav_step(reqs, codes, slots)

    def _code2wav_step(self, reqs, codes, slots):
        state = self.c2w_state.select(slots)
        if codes.shape[-1] == 1 and self.c2w_graph is not None:
            res = self.c2w_graph.run(len(reqs), {"codes": codes, **dict(zip(state_names(state), state.tensors()))})
            audio, state = res["audio"], state_from(res, state.layout, prefix="new_")
            state = state.clone()  # copy out of the static buffers
        else:
            audio, state = self.model.code2wav.step_padded(codes, state)
        return audio.float(), state


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

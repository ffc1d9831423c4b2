"""``omni-rt census``: what each stage of the runtime launches, counted on the meta device (no GPU).

The model is built on the meta device directly in bf16 (no weights, no init kernels). Each stage then runs once
through the CUDA code path — Triton launchers forced on, their launches recorded and not executed — by calling
the engine's own stage callables, which carry ``profiling.census_stage(name)`` markers:

====================  =========================================================================================
stage                 what runs (batch B)
====================  =========================================================================================
audio_encode          ``thinker.audio_tower`` on B audios of ``audio_seconds`` (30 s) — as ``Engine._prepare``
thinker_prefill       ``DecoderRunner.prefill`` of B prompts of 75 tokens + lm_head + first-token sampling —
                      as ``Engine._prefill_step`` (the engine runs prefill eagerly at its real length)
thinker_decode        ``ThinkerDecodeGraphs`` step (embed → decoder → lm_head → sample) at KV context
                      ``DECODE_CONTEXT`` — the graphed step ``Engine._decode_step`` replays
talker_prefill        the talker's 80-token prefill + first code 0 — as ``SpeechStage._prefill_step``
talker_decode         ``speech.talker_decode_step`` (trailing-text entry, decoder, codec head, sampling)
code_predictor_frame  ``speech.code_predictor_step`` through ``code_predictor_graphs`` (15 residual codes)
code2wav_step         ``speech_stage.code2wav_step``: one streaming frame through ``code2wav_graphs``
====================  =========================================================================================

Host reads inside a stage (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean masks, ``bool(t)``) are
counted as ``host_syncs``; on meta they return stand-ins (0, zeros, "no element") so the code runs on. The
engine's one read-back per step (the sampled ids, the audio) lies outside the per-token stages.

``est_ms`` is a MODEL (``omni_rt.profiling``: roofline of each launch plus a launch floor, plus host syncs), not
a measurement. ``first_packet`` adds the stages on the audio-in path in the engine's order — encode, thinker
prefill, the thinker decode step of the same engine step, talker prefill, one code-predictor frame, one Code2Wav
step — plus the two read-backs between them that lie outside the stages (decode ids, the audio chunk).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from typing import Iterator

import torch

from . import profiling
from .profiling import CensusRecorder, StageRecord, census_stage

STAGES = ("audio_encode", "thinker_prefill", "thinker_decode", "talker_prefill", "talker_decode",
          "code_predictor_frame", "code2wav_step")
FIRST_PACKET_STAGES = ("audio_encode", "thinker_prefill", "thinker_decode", "talker_prefill",
                       "code_predictor_frame", "code2wav_step")
FIRST_PACKET_READBACKS = 2   # thinker decode ids, the first audio chunk (the prefills' reads are in-stage)
QUANT_CHOICES = (None, "fp8")


@dataclasses.dataclass
class CensusResult:
    config: str
    batch: int
    records: dict            # stage name -> StageRecord (plus "<outside>")

    def stage(self, name: str) -> StageRecord:
        return self.records.get(name) or StageRecord(name)

    def to_json(self) -> dict:
        stages = [self.stage(name).summary() for name in STAGES]
        by_name = {s["name"]: s for s in stages}
        first = {hw: round(sum(by_name[n]["est_ms"][hw] for n in FIRST_PACKET_STAGES)
                           + FIRST_PACKET_READBACKS * profiling.T_SYNC_S * 1e3, 4) for hw in profiling.HARDWARE}
        outside = self.stage(CensusRecorder.OUTSIDE)
        return {"config": self.config, "batch": self.batch, "stages": stages, "first_packet": {"est_ms": first},
                "outside_stages": {"launches": len(outside.launches), "host_syncs": outside.host_syncs},
                "model": {"note": "est_ms is a roofline-plus-launch MODEL, not a measurement",
                          "hardware": profiling.HARDWARE, "t_launch_graphed_s": profiling.T_LAUNCH_GRAPHED_S,
                          "t_launch_eager_s": profiling.T_LAUNCH_EAGER_S, "t_sync_s": profiling.T_SYNC_S,
                          "decode_context": profiling.DECODE_CONTEXT}}

    def table(self) -> str:
        rows = [f"{'stage':<22}{'launches':>9}{'aten':>7}{'triton':>8}{'syncs':>7}{'GB':>9}{'GFLOP':>10}"
                f"{'graphed':>9}{'H100 ms':>10}{'H200 ms':>10}"]
        data = self.to_json()
        for s in data["stages"]:
            rows.append(f"{s['name']:<22}{s['launches']:>9}{s['aten_ops']:>7}{s['triton_launches']:>8}"
                        f"{s['host_syncs']:>7}{s['bytes'] / 1e9:>9.3f}{s['flops'] / 1e9:>10.2f}"
                        f"{str(s['graphed']):>9}{s['est_ms']['h100']:>10.3f}{s['est_ms']['h200']:>10.3f}")
        fp = data["first_packet"]["est_ms"]
        rows.append(f"{'first_packet':<22}{'':>68}{fp['h100']:>10.3f}{fp['h200']:>10.3f}")
        rows.append("est_ms: roofline-plus-launch model (omni_rt.profiling), not a measurement")
        return "\n".join(rows)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Module constructors skip their weight initialisation (nothing to initialise on meta; no launches)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_meta_model(cfg, dtype: torch.dtype = torch.bfloat16, quant: str | None = None):
    """The OmniModel on the meta device, parameters directly in ``dtype``, non-persistent buffers built.

    quant: None (weights in ``dtype``) or "fp8" (block-FP8 decoder weights, issue 15's format).
    """
    from .models.omni import OmniModel

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    meta = torch.device("meta")
    with _no_init(), _default_dtype(dtype), meta:
        # fp8: the thinker/talker decoder projections hold block-FP8 codes + fp32 scale grids, as a GPU of
        # sm_89+ keeps them (FP8Linear / FP8 experts); everything else stays in ``dtype``.
        model = OmniModel(cfg, fp8=(quant == "fp8"))
    for sub in model.modules():   # FP8 scale grids are float32 whatever the activation dtype
        for name, p in list(sub._parameters.items()):
            if p is not None and name.endswith("scale_inv") and p.dtype != torch.float32:
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, dtype=torch.float32),
                                                           requires_grad=False)
    for sub in model.modules():
        hook = getattr(sub, "materialize_buffers", None)
        if callable(hook):
            hook(meta)
    return model.eval()


def _chat_prompt(cfg, n: int) -> list[int]:
    """n token ids: a user turn then '<|im_start|>assistant\\n' (the talker's recipe needs the assistant turn)."""
    filler = 1
    head = [cfg.im_start_token_id, cfg.user_token_id]
    tail = [cfg.im_end_token_id, cfg.im_start_token_id, cfg.assistant_token_id, filler]
    return head + [filler] * max(n - len(head) - len(tail), 0) + tail


def census(config: str | dict | object = "full", batch: int = 1, *, dtype: torch.dtype = torch.bfloat16,
           quant: str | None = None, audio_seconds: float = 30.0, thinker_prefill_tokens: int = 75,
           talker_prefill_tokens: int = 80, context: int | None = None, block_size: int = 16,
           max_prefill_tokens: int = 4096) -> CensusResult:
    """Count every stage's launches, host syncs, bytes and flops for ``config`` at ``batch`` (see the module doc).

    config: "full" | "small" | "tiny" | a config.json path or checkpoint dir | a config dict | an OmniConfig.
    context: KV length of the decode stages (default ``profiling.DECODE_CONTEXT``).
    """
    from .config import OmniConfig
    from .engine.engine import Engine
    from .engine.graphs import ThinkerDecodeGraphs, code2wav_graphs, code_predictor_graphs
    from .engine.kv_cache import KVCachePool
    from .engine.model_runner import DecoderRunner, text_positions
    from .engine.requests import EngineRequest, Phase
    from .engine.speech import TalkerTextFeed, code_predictor_step, new_talker_request, talker_decode_step, \
        talker_first_code
    from .engine.speech_stage import code2wav_step
    from .kernels import force_triton
    from .request import SamplingParams
    from .tokenizer import IncrementalDetokenizer

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    context = profiling.DECODE_CONTEXT if context is None else int(context)
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if isinstance(config, OmniConfig):
        cfg, label = config, "custom"
    else:
        from .testing.configs import resolve_config   # named shapes; a tool, not the runtime path

        cfg = OmniConfig.from_dict(resolve_config(config))
        label = config if isinstance(config, str) else "custom"
    meta = torch.device("meta")
    B = batch
    cdiv = lambda a, b: -(-a // b)  # noqa: E731

    recorder = CensusRecorder(dry=True)
    with recorder, force_triton(True), torch.inference_mode():
        model = build_meta_model(cfg, dtype, quant)
        th, tc = model.thinker, cfg.thinker.text

        # ---- audio_encode: the engine encodes a request's audios in one audio_tower call
        frames = int(round(audio_seconds * 100))
        mels = [torch.empty(cfg.thinker.audio.num_mel_bins, frames, device=meta) for _ in range(B)]
        with census_stage("audio_encode"):   # as Engine._prepare
            th.audio_tower(torch.cat(mels, dim=1).to(dtype), [frames] * B)

        # ---- thinker_prefill: Engine._prefill_step on B fresh prompts
        n = thinker_prefill_tokens
        pool = KVCachePool(tc.num_hidden_layers, B * cdiv(n, block_size), block_size, tc.num_key_value_heads,
                           tc.head_dim, dtype, meta)
        runner = DecoderRunner(th.forward, pool, max_prefill_tokens)
        prompt = _chat_prompt(cfg, n)
        params = SamplingParams().resolved("thinker")
        reqs = []
        for i in range(B):
            r = EngineRequest(f"census-{i}", prompt, [], params, SamplingParams().resolved("talker"), None,
                              frozenset([cfg.im_end_token_id]), i, i, IncrementalDetokenizer(None))
            r.seq_id, r.phase = i, Phase.PREFILL
            r.embeds = torch.empty(n, tc.hidden_size, dtype=dtype, device=meta)
            r.positions = text_positions(0, n, meta)
            reqs.append(r)
        engine = types.SimpleNamespace(running=reqs, max_prefill_tokens=max_prefill_tokens, runner=runner,
                                       model=model, device=meta, pushed=[],
                                       tap_layer=cfg.talker.accept_hidden_layer if cfg.has_talker else None)
        engine._tap = types.MethodType(Engine._tap, engine)
        engine._sample_device = types.MethodType(Engine._sample_device, engine)
        engine._push_token = lambda r, tok: engine.pushed.append(tok)
        Engine._prefill_step(engine)

        # ---- thinker_decode: the graphed step at KV context `context`
        pool = KVCachePool(tc.num_hidden_layers, B * cdiv(context, block_size), block_size,
                           tc.num_key_value_heads, tc.head_dim, dtype, meta)
        for i in range(B):
            pool.add_sequence(i, context - 1)
        graphs = ThinkerDecodeGraphs(th, pool, B, context, use_graphs=True)
        out = graphs.decode(list(range(B)), [1] * B, [context - 1] * B, [params] * B, [1] * B, list(range(B)))
        out["next_ids"].tolist()   # the engine's read-back, outside the stage

        if cfg.has_talker:
            kc = cfg.talker.text
            m = talker_prefill_tokens
            tpool = KVCachePool(kc.num_hidden_layers, B * cdiv(m + 1, block_size), block_size,
                                kc.num_key_value_heads, kc.head_dim, dtype, meta)
            trunner = DecoderRunner(model.talker.forward, tpool, max_prefill_tokens)
            speaker = next(iter(cfg.talker.speaker_id.values()))
            trs = []
            for i in range(B):
                feed = TalkerTextFeed(model, prompt, reqs[i].embeds, None, speaker, (cfg.im_end_token_id,), 64)
                feed.push([1, 1, 1])                  # the thinker is a few tokens ahead of the talker
                feed._a_token_proj(3)                 # tokens projected in earlier steps
                trs.append(new_talker_request((1 << 40) + i, feed, SamplingParams().resolved("talker")))

            # ---- talker_prefill: SpeechStage._prefill_step (prefill, then the first code 0)
            embeds = [torch.empty(m, kc.hidden_size, dtype=dtype, device=meta) for _ in range(B)]
            positions = [text_positions(0, m, meta)] * B
            with census_stage("talker_prefill"):
                hidden, _ = trunner.prefill([t.seq_id for t in trs], embeds, positions)
            with census_stage("talker_prefill"):
                talker_first_code(model, trunner, trs, torch.stack([h[-1] for h in hidden]))

            # ---- code_predictor_frame: the frame graph (15 residual codes, sampling as the talker samples)
            cp = model.talker.code_predictor
            frame_graph = code_predictor_graphs(cp, B, meta, dtype, use_graphs=True)
            code_predictor_step(model, trs, cp.workspace(B, meta, dtype), frame_graph)

            # ---- talker_decode: one step with its trailing-text entry
            talker_decode_step(model, trunner, trs)

            # ---- code2wav_step: one frame per stream through the Code2Wav graph
            c2w = model.code2wav
            state = c2w.init_state(B, meta, dtype)
            c2w_graph = code2wav_graphs(c2w, B, frames=1, use_graphs=True)
            codes = torch.zeros(B, cfg.code2wav.num_quantizers, 1, dtype=torch.long, device=meta)
            code2wav_step(c2w, state, c2w_graph, codes, torch.arange(B, device=meta)).cpu()
    return CensusResult(label, B, dict(recorder.stages))


def main(args) -> int:
    """``omni-rt census`` entry (argparse namespace: config, batch, json, quant)."""
    try:
        result = census(args.config, args.batch, quant=args.quant)
    except NotImplementedError as e:
        print(f"[omni-rt] {e}", flush=True)
        return 2
    print(f"[omni-rt] census of {args.config} at batch {args.batch} (meta device, bf16, Triton launchers forced; "
          f"nothing executed)")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"[omni-rt] wrote {args.json}")
    return 0

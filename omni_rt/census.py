"""``omni-rt census``: what each stage of the runtime launches, counted on the meta device (no GPU).

The model is built on the meta device directly in bf16 (no weights, no init kernels). Each stage then runs once
through the CUDA code path — Triton launchers forced on, their launches recorded and not executed — by calling
the engine's own stage callables, which carry ``profiling.census_stage(name)`` markers:

====================  =========================================================================================
stage                 what runs (batch B)
====================  =========================================================================================
audio_encode          ``thinker.audio_tower`` on B audios of ``audio_seconds`` (30 s) — as ``Stages.audio_encode``
vision_encode         ``Stages.vision_encode``: B requests of one ``image_size`` (1280×720) image each — the vision
                      tower (patch embed, blocks, merger and deepstack mergers) and the scatter of its features
                      into the prompt (absent for a checkpoint without a vision tower)
thinker_prefill       ``Stages.thinker_prefill``: B prompts of 75 tokens + lm_head + first-token sampling, at the
                      token bucket the engine runs (``PrefillGraphs``: 128 for 75 tokens, replayed on CUDA)
thinker_decode        ``Stages.thinker_decode`` through ``ThinkerDecodeGraphs`` (embed → decoder → lm_head →
                      sample) at KV context ``DECODE_CONTEXT`` — the step the engine replays as a graph
talker_prefill        ``Stages.talker_prefill`` (80 tokens, bucket 128) + ``Stages.sample_code0`` (first code 0)
talker_decode         ``Stages.speech_frame`` through ``speech_frame_graphs`` — the steady-state speech frame the
                      engine replays as one graph per batch bucket: its talker decode (trailing-text entry,
                      decoder, code 0) and the eager input fill around the replay
code_predictor_frame  the same frame's code-predictor part (15 residual codes)
code2wav_step         the same frame's one-frame streaming Code2Wav step
====================  =========================================================================================

``graphed`` is true exactly for the stages the engine replays from a CUDA graph (the runners it builds on CUDA
are installed; on meta each runs its step function eagerly under ``census_graphed``). The first packet's own
code-predictor frame and Code2Wav step (run through their own graphs) are costed as the steady-state ones.

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
from typing import Iterator

import torch

from . import profiling
from .profiling import CensusRecorder, StageRecord, census_stage

STAGES = ("audio_encode", "vision_encode", "thinker_prefill", "thinker_decode", "talker_prefill", "talker_decode",
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


def _image_request(cfg, i: int, height: int, width: int, dtype: torch.dtype, device: torch.device):
    """A request whose prompt is one height×width image (``VS`` + its pads expanded + ``VE``) and a question, the
    image's pixel values an empty tensor of the processor's shape on ``device`` (nothing is computed)."""
    from .engine.sequence import Request, Sequence
    from .models.mrope import VisionItem, expand_vision_pads
    from .prompting import VisionInput
    from .request import SamplingParams
    from .vision import VisionPreprocessConfig, image_size

    th = cfg.thinker
    pre = VisionPreprocessConfig.from_checkpoint(None, th.vision)
    h, w = image_size(height, width, pre)
    item = VisionItem("image", (1, h // pre.patch_size, w // pre.patch_size))
    prompt = ([cfg.im_start_token_id, cfg.user_token_id, th.vision_start_token_id]
              + expand_vision_pads(item, th, th.vision.spatial_merge_size)
              + [th.vision_end_token_id, 1, cfg.im_end_token_id, cfg.im_start_token_id, cfg.assistant_token_id])
    seq = Sequence(i, SamplingParams().resolved("thinker"), (cfg.im_end_token_id,), i, prompt)
    req = Request(f"census-vision-{i}", seq, [], None)
    req.vision = [VisionInput(item, torch.empty(h * w // pre.patch_size ** 2, pre.patch_dim, dtype=dtype,
                                                device=device))]
    return req


def _chat_prompt(cfg, n: int) -> list[int]:
    """n token ids: a user turn then '<|im_start|>assistant\\n' (the talker's recipe needs the assistant turn)."""
    filler = 1
    head = [cfg.im_start_token_id, cfg.user_token_id]
    tail = [cfg.im_end_token_id, cfg.im_start_token_id, cfg.assistant_token_id, filler]
    return head + [filler] * max(n - len(head) - len(tail), 0) + tail


def census(config: str | dict | object = "full", batch: int = 1, *, dtype: torch.dtype = torch.bfloat16,
           quant: str | None = None, audio_seconds: float = 30.0, image_size: tuple[int, int] = (720, 1280),
           thinker_prefill_tokens: int = 75,
           talker_prefill_tokens: int = 80, context: int | None = None, block_size: int = 16,
           max_prefill_tokens: int = 4096) -> CensusResult:
    """Count every stage's launches, host syncs, bytes and flops for ``config`` at ``batch`` (see the module doc).

    config: "full" | "small" | "tiny" | a config.json path or checkpoint dir | a config dict | an OmniConfig.
    context: KV length of the decode stages (default ``profiling.DECODE_CONTEXT``).
    image_size: (height, width) of the vision_encode stage's image.
    """
    from .config import OmniConfig
    from .engine.config import EngineConfig
    from .engine.graphs import ThinkerDecodeGraphs
    from .engine.kv_cache import KVCachePool
    from .engine.sequence import Request, Sequence
    from .engine.stages import Stages
    from .kernels import force_triton
    from .models.layers import text_positions
    from .models.talker import TalkerTextFeed
    from .request import SamplingParams
    from .sampling import to_device

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
    n, m = thinker_prefill_tokens, talker_prefill_tokens

    recorder = CensusRecorder(dry=True)
    with recorder, force_triton(True), torch.inference_mode():
        model = build_meta_model(cfg, dtype, quant)
        th, tc = model.thinker, cfg.thinker.text
        # The engine's stage callables, with the graph runners it builds on CUDA (never captured on meta: each
        # run calls the captured step function) and KV pools sized per stage, so the attention kernels' bytes
        # are those of the stated context.
        ecfg = EngineConfig(max_batch_size=B, max_model_len=max(context, n) + 64, max_prefill_tokens=max_prefill_tokens,
                            kv_block_size=block_size, kv_cache_tokens=B * max(context, n, m + 1), cuda_graphs=True)
        st = Stages(model, ecfg, meta, dtype)

        # ---- audio_encode: one audio_tower call over the request's audios (as Stages.audio_encode)
        frames = int(round(audio_seconds * 100))
        mels = [torch.empty(cfg.thinker.audio.num_mel_bins, frames, device=meta) for _ in range(B)]
        with census_stage("audio_encode"):
            th.audio_tower(torch.cat(mels, dim=1).to(dtype), [frames] * B)

        # ---- vision_encode: one image per request through the engine's callable (as Engine._prepare calls it)
        if th.visual is not None:
            for i in range(B):
                req = _image_request(cfg, i, *image_size, dtype, meta)
                st.vision_encode(req, to_device(req.thinker.prompt_ids, torch.long, meta), [])

        # ---- thinker_prefill: B fresh prompts of n tokens
        prompt = _chat_prompt(cfg, n)
        params = SamplingParams().resolved("thinker")
        reqs = []
        for i in range(B):
            seq = Sequence(i, params, (cfg.im_end_token_id,), i, prompt)
            seq.set_prompt(torch.empty(n, tc.hidden_size, dtype=dtype, device=meta), text_positions(0, n, meta))
            reqs.append(Request(f"census-{i}", seq, [], None))
        pool = KVCachePool(tc.num_hidden_layers, B * cdiv(n, block_size), block_size, tc.num_key_value_heads,
                           tc.head_dim, dtype, meta)
        st.thinker_runner = st.decoder_runner("thinker", pool)
        tap = cfg.talker.accept_hidden_layer if cfg.has_talker else None
        ids, _ = st.thinker_prefill(reqs, [n] * B, tap)
        ids.tolist()   # the engine's read-back, outside the stage
        for r in reqs:
            r.thinker.prefilled = n
            r.thinker.push(1)

        # ---- thinker_decode: the graphed step at KV context `context`
        pool = KVCachePool(tc.num_hidden_layers, B * cdiv(context, block_size), block_size,
                           tc.num_key_value_heads, tc.head_dim, dtype, meta)
        for r in reqs:
            pool.add_sequence(r.thinker.seq_id, context - 1)
        st.thinker_pool = pool
        st.decode_graphs = ThinkerDecodeGraphs(th, pool, B, ecfg.max_model_len)
        st.thinker_decode(reqs).tolist()   # the engine's read-back, outside the stage

        if cfg.has_talker:
            kc = cfg.talker.text
            tpool = KVCachePool(kc.num_hidden_layers, B * cdiv(m + 1, block_size), block_size,
                                kc.num_key_value_heads, kc.head_dim, dtype, meta)
            st.talker_pool = tpool
            st.talker_runner = st.decoder_runner("talker", tpool)
            speaker = next(iter(cfg.talker.speaker_id.values()))
            tparams = SamplingParams().resolved("talker")
            for i, r in enumerate(reqs):
                r.slot = i
                r.speaker_id = speaker
                r.talker = Sequence((1 << 40) + i, tparams, (cfg.talker.codec_eos_token_id,), i)
                r.talker.set_prompt(torch.empty(m, kc.hidden_size, dtype=dtype, device=meta),
                                    text_positions(0, m, meta))
                r.talker.feed = TalkerTextFeed(model, prompt, r.thinker.embeds, None, speaker, (cfg.im_end_token_id,), 64)
                r.talker.feed.push([1, 1, 1])             # the thinker is a few tokens ahead of the talker
            slots = to_device(list(range(B)), torch.long, meta)

            # ---- talker_prefill and its first code 0 (the first frame's code predictor and Code2Wav step are
            #      costed as the steady-state frame's: the same kernels through their own graphs)
            last = torch.stack(st.talker_prefill(reqs, [m] * B))
            with census_stage("talker_prefill"):
                st.sample_code0(reqs, last, slots)
            for r in reqs:
                r.talker.prefilled = m
                r.talker.push(0)

            # ---- the steady-state speech frame, as the engine replays it (one graph per batch bucket): talker
            #      decode with its trailing-text entry + code 0 → code-predictor frame → one Code2Wav step
            for r in reqs:
                r.talker.feed.entry(len(r.talker.output) - 1)   # the scheduler's readiness check (projects the token)
            st.speech_graph = st.speech_frame_runner()
            st.speech_frame(reqs)["audio"].cpu()   # the engine's read-back, outside the stages
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

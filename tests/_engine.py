"""Drive the engine synchronously in the test thread (no engine thread): the one generation loop, used by the
tests that need more than the Runtime's public API (a model object, block sizes, per-step inspection)."""
from __future__ import annotations

import numpy as np
import torch

from omni_rt.engine.config import EngineConfig
from omni_rt.engine.engine import Engine
from omni_rt.engine.sequence import Request, Sequence
from omni_rt.request import SamplingParams
from omni_rt.tokenizer import IncrementalDetokenizer


def make_engine(model, device="cpu", dtype=torch.float32, **cfg) -> Engine:
    cfg.setdefault("kv_cache_tokens", 4096)
    cfg.setdefault("max_model_len", 4096)
    return Engine(model, EngineConfig(**cfg), torch.device(device), dtype)


def make_request(model, rid: str, prompt, thinker: SamplingParams, talker: SamplingParams | None = None,
                 speaker: str = "ethan", audios=()) -> Request:
    tp = thinker.resolved("thinker")
    stop = tp.stop_token_ids if tp.stop_token_ids is not None else [model.cfg.im_end_token_id]
    seq = Sequence(-1, tp, stop, tp.seed if tp.seed is not None else 0, prompt_ids=list(prompt))
    talker_seq, speaker_id = None, None
    if talker is not None:
        kp = talker.resolved("talker")
        kstop = kp.stop_token_ids if kp.stop_token_ids is not None else [model.cfg.talker.codec_eos_token_id]
        talker_seq = Sequence(-1, kp, kstop, kp.seed if kp.seed is not None else 0)
        speaker_id = model.cfg.talker.speaker(speaker)
    return Request(rid, seq, list(audios), IncrementalDetokenizer(None), talker=talker_seq, speaker_id=speaker_id)


def run(engine: Engine, reqs: list[Request], max_steps: int = 10_000) -> list[Request]:
    """Submit and step until every request is done; raises a request's error."""
    for r in reqs:
        engine.submit(r)
    for _ in range(max_steps):
        if not engine.sched.running and not engine.sched.waiting:
            break
        engine.step()
    for r in reqs:
        if r.error is not None:
            raise r.error
    return reqs


def audio_of(req: Request) -> np.ndarray:
    """The request's streamed PCM, concatenated (drains its output queue)."""
    pcm = []
    while not req.out.empty():
        c = req.out.get()
        if c.audio.size:
            pcm.append(c.audio)
    return np.concatenate(pcm) if pcm else np.zeros(0, np.float32)


def generate_text(model, prompts, params, audios=None, **cfg) -> list[Request]:
    """Thinker-only generation for every prompt in one engine (batched); requests in prompt order."""
    engine = make_engine(model, **cfg)
    audios = audios or [()] * len(prompts)
    reqs = [make_request(model, f"r{i}", p, sp, audios=a) for i, (p, sp, a) in enumerate(zip(prompts, params, audios))]
    run(engine, reqs)
    assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]
    return reqs

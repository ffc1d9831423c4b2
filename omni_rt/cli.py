"""Command line: ``omni-rt demo | run | bench | serve | census`` (also ``python -m omni_rt``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _log(msg: str) -> None:
    print(msg, flush=True)


class _Timer:
    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.t = time.perf_counter()
        _log(f"[omni-rt] {self.label} ...")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            _log(f"[omni-rt] {self.label}: {time.perf_counter() - self.t:.2f} s")


def _stream_reply(rt, prompt, speaker: str, out_path: str | None, thinker_tokens: int, talker_tokens: int) -> dict:
    from . import audio as audio_mod
    from .request import SamplingParams

    pcm, text = [], []
    t0 = time.perf_counter()
    frames_seen = 0
    _log("[omni-rt] reply (text streams as it is generated; audio frames counted as they arrive):")
    metrics = {}
    for chunk in rt.stream(prompt, speaker=speaker,
                           thinker=SamplingParams(temperature=0.0, max_new_tokens=thinker_tokens),
                           talker=SamplingParams(temperature=0.0, max_new_tokens=talker_tokens)
                           if rt.has_talker else None,
                           return_audio=rt.has_talker):
        if chunk.text_delta:
            text.append(chunk.text_delta)
            sys.stdout.write(chunk.text_delta)
            sys.stdout.flush()
        if chunk.audio.size:
            pcm.append(chunk.audio)
            frames_seen += 1
            if frames_seen == 1:
                sys.stdout.write(f"\n[audio: first packet after {(time.perf_counter() - t0) * 1000:.0f} ms]\n")
        if chunk.finished:
            metrics = chunk.metrics or {}
    sys.stdout.write("\n")
    audio = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
    if out_path and rt.has_talker:
        audio_mod.write_wav(out_path, audio, 24000)
        _log(f"[omni-rt] wrote {out_path}: {audio.size / 24000:.2f} s of 24 kHz audio in {frames_seen} chunks")
    _log("[omni-rt] request: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items() if v is not None))
    _log("[omni-rt] engine time per stage (ms): " + ", ".join(f"{k}={v:.1f}" for k, v in rt.stage_times().items()))
    return metrics


def cmd_demo(args) -> int:
    import torch

    from .bench import ASSET
    from .runtime import Runtime
    from .testing import make_checkpoint

    _log("[omni-rt] demo: the weights are RANDOM (a synthetic checkpoint in the real layout), so the reply is "
         "noise-like text and audio; the point is the pipeline, its streaming and its timings.")
    path = os.path.abspath(args.checkpoint_dir or os.path.join(".omni_rt_cache", f"demo-{args.config}"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        with _Timer(f"writing synthetic '{args.config}' checkpoint to {path}"):
            make_checkpoint(path, args.config, seed=0, dtype=torch.float32, progress=lambda m: _log(f"    {m}"))
    else:
        _log(f"[omni-rt] using the synthetic checkpoint at {path}")
    with _Timer("loading the runtime"):
        rt = Runtime(path, device=args.device)
    try:
        messages = [{"role": "user", "content": [{"type": "audio", "audio": ASSET},
                                                 {"type": "text", "text": "Answer briefly."}]}]
        _log(f"[omni-rt] question: {ASSET} (espeak-ng: 'What is the weather like today?'), speaker {args.speaker}")
        with _Timer("streaming the reply"):
            _stream_reply(rt, messages, args.speaker, args.out, args.max_new_tokens, args.talker_max_new_tokens)
    finally:
        rt.close()
    return 0


def cmd_run(args) -> int:
    from .runtime import Runtime

    with _Timer(f"loading {args.model}"):
        rt = Runtime(args.model, device=args.device, progress=lambda m: _log(f"    {m}"), quantization=args.quant)
    try:
        content = []
        if args.audio:
            content.append({"type": "audio", "audio": args.audio})
        if args.text:
            content.append({"type": "text", "text": args.text})
        if not content:
            raise SystemExit("give --audio and/or --text")
        _stream_reply(rt, [{"role": "user", "content": content}], args.speaker, args.out, args.max_new_tokens,
                      args.talker_max_new_tokens)
    finally:
        rt.close()
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import run_benchmark
    from .runtime import Runtime

    levels = [int(c) for c in args.concurrency.split(",")]
    if bool(args.model) == bool(args.synthetic):
        raise SystemExit("give exactly one of --model DIR or --synthetic tiny|small|full")
    with _Timer("building the runtime"):
        if args.synthetic:
            from .testing import build_synthetic_model

            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            # --quant fp8: weights quantized as drawn and kept FP8 (on CPU the FP8 ops dequantize per call)
            model = build_synthetic_model(args.synthetic, dtype, device, fp8=args.quant == "fp8")
            rt = Runtime(model, device=device, dtype=dtype, max_batch_size=max(levels))
        else:
            rt = Runtime(args.model, device=args.device, max_batch_size=max(levels),
                         progress=lambda m: _log(f"    {m}"), quantization=args.quant)
    try:
        with _Timer(f"benchmark at concurrency {levels}"):
            report = run_benchmark(rt, levels, seconds=args.seconds, max_new_tokens=args.max_new_tokens,
                                   talker_max_new_tokens=args.talker_max_new_tokens, repeats=args.repeats)
    finally:
        rt.close()
    report.update({"model": args.model or f"synthetic:{args.synthetic}", "device": str(rt.device),
                   "dtype": str(rt.dtype), "quant": args.quant,
                   "weight_GB": {k: v / 1e9 for k, v in rt.memory().items()}, "note": "synthetic weights route near-uniformly (worst case for expert "
                   "reuse)" if args.synthetic else ""})
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text)
    return 0


def cmd_serve(args) -> int:
    from .serve.server import main as serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-rt", description="Qwen3-Omni inference runtime")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    common.add_argument("--speaker", default="ethan")
    common.add_argument("--max-new-tokens", type=int, default=24, help="thinker tokens")
    common.add_argument("--talker-max-new-tokens", type=int, default=48, help="talker steps (T steps -> T-1 frames)")
    d = sub.add_parser("demo", parents=[common], help="stream a spoken reply from a synthetic checkpoint")
    d.add_argument("--config", default="tiny", choices=["tiny", "small"])
    d.add_argument("--checkpoint-dir", default=None)
    d.add_argument("--out", default="reply.wav")
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", parents=[common], help="answer an audio file with a real checkpoint")
    r.add_argument("--model", required=True)
    r.add_argument("--audio", default=None)
    r.add_argument("--text", default=None)
    r.add_argument("--out", default="reply.wav")
    r.add_argument("--stream", action="store_true", help="(always streams; kept for compatibility)")
    r.add_argument("--quant", default=None, choices=["fp8"],
                   help="quantize the thinker/talker decoder weights to block FP8 at load")
    r.set_defaults(fn=cmd_run)
    b = sub.add_parser("bench", parents=[common], help="first-packet latency, RTF, tok/s per concurrency")
    b.add_argument("--model", default=None)
    b.add_argument("--synthetic", default=None, choices=["tiny", "small", "full"])
    b.add_argument("--concurrency", default="1")
    b.add_argument("--seconds", type=float, default=5.0, help="length of the spoken question")
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--json", default=None)
    b.add_argument("--quant", default=None, choices=["fp8"],
                   help="block-FP8 thinker/talker decoder weights (quantized at load / as drawn)")
    b.set_defaults(fn=cmd_bench)
    s = sub.add_parser("serve", help="OpenAI-compatible server: chat completions with speech, Realtime (serve extra)")
    from .serve.server import add_arguments

    add_arguments(s)
    s.set_defaults(fn=cmd_serve)
    c = sub.add_parser("census", help="kernel-level profiling without a GPU: launches, host syncs, bytes, "
                                      "flops and a modelled time per stage (meta device)")
    c.add_argument("--config", default="full", help="full | small | tiny | path to a config.json or checkpoint")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--json", default=None, help="write the census as JSON here")
    c.add_argument("--quant", default=None, choices=["fp8"], help="weight quantization to count (fp8: not yet)")
    c.set_defaults(fn=cmd_census)
    return p


def cmd_census(args) -> int:
    from .census import main as census_main

    return census_main(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)

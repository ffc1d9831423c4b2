"""``omni-rt serve``: build the app for a checkpoint (or the demo's synthetic one) and run it with uvicorn, or as a
Ray Serve deployment with ``--ray``."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a HF-format checkpoint directory (config.json, safetensors, tokenizer files)")
    src.add_argument("--synthetic", choices=["tiny", "small"],
                     help="serve the demo's synthetic checkpoint (random weights; tokenizer and chat template included)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests in flight (running + waiting) before the server answers 429 (default 4 x batch)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the folder name)")
    p.add_argument("--api-key", default=os.environ.get("OMNI_RT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $OMNI_RT_API_KEY; none = open)")
    p.add_argument("--talker-max-new-tokens", type=int, default=None,
                   help="talker steps per reply (default: the Runtime's, 4096; T steps give T-1 frames of 80 ms)")
    p.add_argument("--max-body-mb", type=float, default=64.0)
    p.add_argument("--max-audio-seconds", type=float, default=600.0)
    p.add_argument("--no-local-media", action="store_true", help="refuse local file paths in image_url/video_url")
    p.add_argument("--vad-threshold", type=float, default=0.5, help="Realtime server_vad default threshold")
    p.add_argument("--ray", action="store_true", help="serve N replicas with Ray Serve (the [ray] extra)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (one GPU each when on CUDA)")
    p.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (ray start --head ...)")
    p.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="with --ray: GPUs per replica (default 1 with CUDA, 0 on cpu)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)


def checkpoint_dir(args) -> str:
    """The checkpoint to serve: --model, or the demo's synthetic one (written once into .omni_rt_cache)."""
    if args.model:
        return args.model
    path = os.path.abspath(os.path.join(".omni_rt_cache", f"demo-{args.synthetic}"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        import torch

        from omni_rt.testing import make_checkpoint  # the synthetic checkpoint only; never on the --model path

        make_checkpoint(path, args.synthetic, seed=0, dtype=torch.float32)
    return path


def app_options(args) -> dict:
    from .protocol import Limits

    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model
                                      else f"omni-rt-synthetic-{args.synthetic}")
    return dict(model_name=name, max_inflight=args.max_queue or 4 * args.max_batch_size, api_key=args.api_key or None,
                limits=Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)),
                              max_media_bytes=int(args.max_body_mb * (1 << 20)),
                              max_audio_seconds=args.max_audio_seconds, allow_local_media=not args.no_local_media),
                talker_max_new_tokens=args.talker_max_new_tokens,
                realtime_options={"vad_threshold": args.vad_threshold})


def runtime_loader(path: str, device: str | None, max_batch_size: int):
    def load():
        import omni_rt

        return omni_rt.Runtime(path, device=device, max_batch_size=max_batch_size)
    return load


def main(args) -> int:
    path = checkpoint_dir(args)
    if args.ray:
        from .ray_serve import serve_with_ray

        return serve_with_ray(args, path)
    import uvicorn

    from .app import create_app

    app = create_app(runtime_loader(path, args.device, args.max_batch_size), **app_options(args))
    print(f"[omni-rt] serving {path} on http://{args.host}:{args.port} (OpenAI-compatible: /v1/chat/completions, "
          f"/v1/realtime, /v1/models, /health)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

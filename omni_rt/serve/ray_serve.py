"""``omni-rt serve --ray --replicas N``: the same app as N Ray Serve replicas behind Ray Serve's HTTP proxy.

Each replica is one process with its own ``Runtime`` (one GPU each on CUDA: Ray's resource scheduling places them);
the proxy spreads requests over the replicas; the routes are the same as the single-process server's.

Multi-node: start Ray on every machine first, then point ``omni-rt serve --ray`` at the cluster::

    head$    ray start --head --port 6379 --num-gpus 8
    worker$  ray start --address HEAD_IP:6379 --num-gpus 8
    head$    omni-rt serve --model /models/Qwen3-Omni-30B-A3B-Instruct --ray --ray-address auto --replicas 16 \\
                 --host 0.0.0.0 --port 8000

(the checkpoint path must exist on every node). Needs the ``ray`` extra: ``pip install "omni_rt[ray]"``.
"""
from __future__ import annotations

import os
import socket
import time


def build_app(path: str, device: str | None, max_batch_size: int, options: dict, num_replicas: int,
              num_gpus: float, num_cpus: float, env: dict | None = None):
    """The bound Ray Serve application (``serve.run`` it)."""
    from ray import serve

    def asgi_app():
        from .app import create_app
        from .server import runtime_loader

        # a replica is ready once its Runtime is loaded (the proxy only routes to ready replicas)
        return create_app(runtime_loader(path, device, max_batch_size), load_in_background=False,
                          replica_name=f"{socket.gethostname()}:{os.getpid()}", **options)

    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    deployment = serve.deployment(serve.ingress(asgi_app)(), name="omni_rt", num_replicas=num_replicas,
                                  ray_actor_options=actor, max_ongoing_requests=options.get("max_inflight", 32),
                                  health_check_period_s=10, graceful_shutdown_timeout_s=30)
    return deployment.bind()


def serve_with_ray(args, path: str) -> int:
    import ray
    from ray import serve

    from .server import app_options

    import torch

    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    gpus = args.num_gpus_per_replica if args.num_gpus_per_replica is not None else (1.0 if on_cuda else 0.0)
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(path, args.device, args.max_batch_size, app_options(args), args.replicas, gpus,
                    args.num_cpus_per_replica)
    serve.run(app, name="omni_rt", route_prefix="/")
    print(f"[omni-rt] {args.replicas} replica(s) of {path} behind Ray Serve on http://{args.host}:{args.port}",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0

"""``omni-rt serve --ray``: two replicas of the tiny checkpoint behind Ray Serve's proxy, on a local Ray instance
(num_cpus=2, no dashboard, half a CPU and no GPU per replica, a free port, a time cap): requests spread over both
replicas and every answer equals the in-process Runtime's (greedy)."""
from __future__ import annotations

import os
import threading

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import omni_rt  # noqa: E402
from omni_rt.serve.protocol import Limits  # noqa: E402
from omni_rt.serve.ray_serve import build_app  # noqa: E402

from omni_rt.serve.live import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_CAP_S = 240


def test_two_replicas_answer_correctly(tiny_checkpoint):
    msgs = [{"role": "user", "content": "What is the weather like today?"}]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=2) as rt:
        ref = rt.generate(msgs, speaker="ethan", thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=6),
                          talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=6))
    port = free_port()
    timer = threading.Timer(TIME_CAP_S, lambda: os._exit(3))   # a hung Ray never hangs the suite
    timer.start()
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "RAY_SERVE_LOG_TO_STDERR": "0"}
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, _system_config={"metrics_report_interval_ms": 600000})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(tiny_checkpoint, "cpu", 2, dict(model_name="tiny", max_inflight=8, limits=Limits(),
                                                         talker_max_new_tokens=6),
                        num_replicas=2, num_gpus=0, num_cpus=0.5)
        serve.run(app, name="omni_rt", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny", "messages": msgs, "modalities": ["text", "audio"], "audio": {"voice": "ethan"},
                "temperature": 0, "max_tokens": 6}
        replicas, answers = set(), []
        with httpx.Client(timeout=60) as c:
            assert c.get(f"{url}/health").status_code == 200
            for _ in range(12):
                r = c.post(f"{url}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                replicas.add(r.headers["x-omni-rt-replica"])
                answers.append(r.json()["choices"][0]["message"]["content"])
                if len(replicas) == 2 and len(answers) >= 4:
                    break
        assert len(replicas) == 2, replicas
        assert all(a == ref.text for a in answers)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            timer.cancel()

"""``omni-rt serve`` against the official ``openai`` client on a live server (tiny checkpoint, CPU, fp32):
chat completions with input_audio and modalities ["text", "audio"], streamed and not, equal (greedy) to
Runtime.generate; 16 concurrent streaming clients; disconnects free their requests; errors, limits, auth, health."""
from __future__ import annotations

import base64
import io
import threading
import time
import wave

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import omni_rt  # noqa: E402
from omni_rt.bench import spoken_question  # noqa: E402
from omni_rt.serve.app import create_app  # noqa: E402
from omni_rt.serve.protocol import Limits  # noqa: E402

from omni_rt.serve.live import live_server  # noqa: E402

from _fixtures import runtime_fixture  # noqa: E402

TALKER_STEPS = 8
TOKENS = 6
TIMEOUT = 120


rt = runtime_fixture(max_batch_size=4)


@pytest.fixture(scope="module")
def server(rt):
    app = create_app(rt, model_name="tiny", max_inflight=24, limits=Limits(max_body_bytes=2 << 20,
                                                                          max_audio_seconds=30),
                     talker_max_new_tokens=TALKER_STEPS)
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def wav_b64(wav_16k: np.ndarray) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(wav_16k, -1, 1) * 32767).round().astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def question_messages(seconds=1.5):
    return [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_b64(spoken_question(seconds)), "format": "wav"}},
        {"type": "text", "text": "Answer briefly."}]}]


def runtime_messages(seconds=1.5):
    """What the server hands the Runtime for question_messages(): the same wav after its 16-bit round trip."""
    pcm = (np.clip(spoken_question(seconds), -1, 1) * 32767).round().astype("<i2")
    return [{"role": "user", "content": [{"type": "audio", "audio": omni_rt.audio.load(pcm, sr=16000)},
                                         {"type": "text", "text": "Answer briefly."}]}]


def expected(rt, voice="chelsie", **thinker):
    g = dict(temperature=0.0, max_new_tokens=TOKENS)
    g.update(thinker)
    return rt.generate(runtime_messages(), speaker=voice, thinker=omni_rt.SamplingParams(**g),
                       talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=TALKER_STEPS))


def field(obj, name):
    """A field of a delta part, whichever way the client library types it (pydantic model or dict)."""
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def pcm16(wav: np.ndarray) -> np.ndarray:
    return (np.clip(wav, -1, 1) * 32767).round().astype("<i2")


def all_free(rt) -> bool:
    s = rt.stats()
    return (s["kv_free_blocks"] == s["kv_total_blocks"] and s["talker_kv_free_blocks"] == s["talker_kv_total_blocks"]
            and s["speech_slots_free"] == s["speech_slots_total"] and s["running"] == 0 and s["waiting"] == 0)


def wait_free(rt, seconds=30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all_free(rt):
            return True
        time.sleep(0.02)
    return all_free(rt)


def test_models_and_health(server, client, rt):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = httpx.get(f"{server}/health", timeout=10).json()
    assert h["status"] == "ok" and h["stats"]["fault"] is None
    assert set(h["stats"]) == {"kv_free_blocks", "kv_total_blocks", "talker_kv_free_blocks", "talker_kv_total_blocks",
                               "speech_slots_free", "speech_slots_total", "running", "waiting", "warmup_s", "fault"}


def test_non_streaming_equals_runtime_generate(client, rt):
    ref = expected(rt)
    r = client.chat.completions.create(model="tiny", messages=question_messages(), modalities=["text", "audio"],
                                       audio={"voice": "chelsie", "format": "wav"}, temperature=0, max_tokens=TOKENS)
    msg = r.choices[0].message
    assert msg.content == ref.text and msg.audio.transcript == ref.text
    with wave.open(io.BytesIO(base64.b64decode(msg.audio.data))) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        got = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert ref.audio.size > 0 and np.array_equal(got, pcm16(ref.audio))
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == ref.finish_reason
    assert msg.audio.expires_at > time.time()


def test_streaming_equals_runtime_generate(client, rt):
    ref = expected(rt)
    stream = client.chat.completions.create(model="tiny", messages=question_messages(),
                                            modalities=["text", "audio"], audio={"voice": "chelsie", "format": "pcm16"},
                                            temperature=0, max_tokens=TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    text, transcript, audio, finish, usage, audio_chunks = [], [], [], None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        if d.content:
            text.append(d.content)
        a = getattr(d, "audio", None)
        if a:
            if field(a, "transcript"):
                transcript.append(field(a, "transcript"))
            if field(a, "data"):
                audio_chunks += 1
                audio.append(np.frombuffer(base64.b64decode(field(a, "data")), dtype="<i2"))
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert "".join(text) == ref.text == "".join(transcript)
    assert np.array_equal(np.concatenate(audio), pcm16(ref.audio))
    assert audio_chunks == TALKER_STEPS - 1 or audio_chunks > 1   # one delta per engine chunk, not one at the end
    assert finish == ref.finish_reason and usage.completion_tokens == len(ref.token_ids)


def test_seed_makes_sampled_replies_reproducible(client):
    kw = dict(model="tiny", messages=question_messages(), modalities=["text", "audio"], audio={"voice": "ethan"},
              temperature=0.9, seed=1234, max_tokens=TOKENS)
    a = client.chat.completions.create(**kw).choices[0].message
    streamed = [c for c in client.chat.completions.create(stream=True, **kw)]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    pcm = np.concatenate([np.frombuffer(base64.b64decode(field(c.choices[0].delta.audio, "data")), dtype="<i2")
                          for c in streamed if c.choices and field(getattr(c.choices[0].delta, "audio", None), "data")])
    with wave.open(io.BytesIO(base64.b64decode(a.audio.data))) as w:
        whole = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert text == a.content and np.array_equal(pcm, whole)


def test_text_only_and_stop_strings(client, rt):
    ref = rt.generate(runtime_messages(), return_audio=False,
                      thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=12))
    r = client.chat.completions.create(model="tiny", messages=question_messages(), temperature=0, max_tokens=12)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.audio is None
    text = ref.text
    assert len(text) >= 4, text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    r = client.chat.completions.create(model="tiny", messages=question_messages(), temperature=0, max_tokens=12,
                                       stop=[stop])
    assert r.choices[0].message.content == text[:cut] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"], "audio": {"voice": "nobody"}},
     400, "audio.voice"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}]},
     400, "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]},
     400, "messages[0].content[0].image_url.url"),
])
def test_bad_requests_are_openai_style_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", **body}, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_size_limits_are_413(server):
    big = "A" * (3 << 20)
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": "' + big.encode() + b'"}',
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    long_pcm = base64.b64encode(np.zeros(24000 * 31, dtype="<i2").tobytes()).decode()
    r = httpx.post(f"{server}/v1/chat/completions", timeout=TIMEOUT, json={"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": long_pcm, "format": "pcm16"}}]}]})
    assert r.status_code == 413, r.text


def test_sixteen_concurrent_streams_complete_and_free_everything(client, rt):
    ref = expected(rt, voice="ethan")
    results, errors = {}, []

    def one(i):
        try:
            text, n_audio = [], 0
            for chunk in client.chat.completions.create(
                    model="tiny", messages=question_messages(), modalities=["text", "audio"],
                    audio={"voice": "ethan", "format": "pcm16"}, temperature=0, max_tokens=TOKENS, stream=True):
                if chunk.choices:
                    d = chunk.choices[0].delta
                    text.append(d.content or "")
                    a = getattr(d, "audio", None)
                    if field(a, "data"):
                        n_audio += len(base64.b64decode(field(a, "data"))) // 2
            results[i] = ("".join(text), n_audio)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT * 2)
    assert not errors, errors[:3]
    assert len(results) == 16 and all(r == (ref.text, ref.audio.size) for r in results.values())
    assert wait_free(rt)


def test_disconnect_mid_stream_frees_the_request(server, rt):
    assert wait_free(rt)
    body = {"model": "tiny", "messages": question_messages(), "modalities": ["text", "audio"], "stream": True,
            "temperature": 0, "max_tokens": 64, "talker": {"max_new_tokens": 1000}}   # ~20-80 s if not aborted
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"data":' in line:   # the first audio delta: the request is speaking; now leave
                    break
            assert not all_free(rt)
    assert wait_free(rt, seconds=8)


def test_disconnect_while_waiting_for_a_whole_reply_frees_the_request(server, rt):
    assert wait_free(rt)
    body = {"model": "tiny", "messages": question_messages(), "modalities": ["text", "audio"], "temperature": 0,
            "max_tokens": 64, "talker": {"max_new_tokens": 1000}}   # ~20-80 s of work if not aborted
    with pytest.raises(httpx.ReadTimeout):      # the client gives up (and closes the connection) mid-request
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=1.0))
    assert wait_free(rt, seconds=8)


def test_full_queue_is_429_with_retry_after(tiny_checkpoint, rt):
    app = create_app(rt, model_name="tiny", max_inflight=1, talker_max_new_tokens=TALKER_STEPS)
    with live_server(app) as url:
        body = {"model": "tiny", "messages": question_messages(), "stream": True, "max_tokens": 64,
                "modalities": ["text", "audio"], "talker": {"max_new_tokens": 200}}
        with httpx.Client(timeout=TIMEOUT) as c:
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as first:
                assert first.status_code == 200
                r = c.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
    assert wait_free(rt)


def test_api_key_is_required_when_set(rt):
    app = create_app(rt, model_name="tiny", api_key="sekret", talker_max_new_tokens=TALKER_STEPS)
    with live_server(app) as url:
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", timeout=TIMEOUT, max_retries=0)
        assert good.models.list().data[0].id == "tiny"


def test_health_is_503_while_loading():
    gate = threading.Event()

    class Never(Exception):
        pass

    def slow_load():
        gate.wait(30)
        raise Never("checkpoint unreadable")

    import uvicorn

    from omni_rt.serve.live import free_port

    app = create_app(slow_load, model_name="x")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(400):
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        for _ in range(200):
            if httpx.get(f"{url}/health", timeout=2).json()["status"] == "failed":
                break
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=2).status_code == 503
    finally:
        gate.set()
        server.should_exit = True
        t.join(timeout=30)


def test_cli_serves_the_synthetic_checkpoint(tmp_path):
    """`omni-rt serve --synthetic tiny` as a user runs it: the demo's checkpoint with its tokenizer and chat template."""
    import os
    import subprocess
    import sys

    from omni_rt.serve.live import free_port

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "omni_rt", "serve", "--synthetic", "tiny", "--device", "cpu",
                             "--port", str(port), "--talker-max-new-tokens", "4", "--api-key", "k"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="k", timeout=TIMEOUT, max_retries=0)
        assert c.models.list().data[0].id == "omni-rt-synthetic-tiny"
        r = c.chat.completions.create(model="omni-rt-synthetic-tiny", max_tokens=4, temperature=0,
                                      modalities=["text", "audio"], audio={"voice": "aiden", "format": "wav"},
                                      messages=[{"role": "user", "content": "Hello, how are you?"}])
        assert r.usage.completion_tokens == 4 and r.choices[0].message.audio.data
        assert os.path.isfile(tmp_path / ".omni_rt_cache" / "demo-tiny" / "tokenizer.json")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_device_fault_makes_health_503(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu") as broken:
        with live_server(create_app(broken, model_name="tiny")) as url:
            def explode(*a, **k):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            broken.engine.stages.thinker_runner.decode = explode   # test-only injection of a device fault
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "device_fault"
            h = httpx.get(f"{url}/health", timeout=10)
            assert h.status_code == 503 and h.json()["status"] == "fault" and "illegal memory" in h.json()["stats"]["fault"]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
            assert r.status_code == 503


def test_bad_requests_do_not_disturb_a_running_stream(client, rt, server):
    ref = expected(rt, voice="ethan")
    stream = client.chat.completions.create(model="tiny", messages=question_messages(), modalities=["text", "audio"],
                                            audio={"voice": "ethan", "format": "pcm16"}, temperature=0,
                                            max_tokens=TOKENS, stream=True)
    text, pcm, bad = [], [], 0
    for chunk in stream:
        if bad < 3:   # bad requests land while this one streams
            bad_bodies = [{"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                                        "input_audio": {"data": "AAAA", "format": "mp3"}}]}]},
                          {"messages": [{"role": "tool", "content": "x"}]}, {"stop": 5, "messages": []}]
            r = httpx.post(f"{server}/v1/chat/completions", json=bad_bodies[bad], timeout=TIMEOUT)
            assert r.status_code == 400, r.text
            bad += 1
        if chunk.choices:
            d = chunk.choices[0].delta
            text.append(d.content or "")
            if field(getattr(d, "audio", None), "data"):
                pcm.append(np.frombuffer(base64.b64decode(field(d.audio, "data")), dtype="<i2"))
    assert bad == 3 and "".join(text) == ref.text and np.array_equal(np.concatenate(pcm), pcm16(ref.audio))


def test_reasoning_content_from_a_thinking_template(tiny_checkpoint, tmp_path):
    """A checkpoint whose chat template opens a <think> span (as Thinking checkpoints' do): the span comes back as
    reasoning_content, apart from content, equal to Runtime.generate's ``reasoning``; streamed the same."""
    import os

    ckpt = tmp_path / "thinking"
    ckpt.mkdir()
    for name in os.listdir(tiny_checkpoint):
        if name != "chat_template.jinja":
            os.symlink(os.path.join(tiny_checkpoint, name), ckpt / name)
    with open(os.path.join(tiny_checkpoint, "chat_template.jinja")) as f:
        template = f.read()
    tail = "{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert template.endswith(tail)
    (ckpt / "chat_template.jinja").write_text(template[:-len(tail)]
                                              + "{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "Hello, how are you?"}]
    with omni_rt.Runtime(str(ckpt), device="cpu") as thinking:
        ref = thinking.generate(msgs, return_audio=False,
                                thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10))
        assert ref.reasoning
        with live_server(create_app(thinking, model_name="thinking")) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
            r = c.chat.completions.create(model="thinking", messages=msgs, temperature=0, max_tokens=10)
            assert r.choices[0].message.reasoning_content == ref.reasoning
            assert r.choices[0].message.content == ref.text
            chunks = list(c.chat.completions.create(model="thinking", messages=msgs, temperature=0, max_tokens=10,
                                                    stream=True))
            assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks
                           if ch.choices) == ref.reasoning


def test_image_url_data_url_and_local_path(client, rt, tmp_path):
    """image_url parts: a base64 data: URL (decoded by the server) and a local file path give the reply the Runtime
    gives for the same pixels; network URLs are refused (tested above)."""
    from PIL import Image

    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    ref = rt.generate([{"role": "user", "content": [{"type": "image", "image": img},
                                                    {"type": "text", "text": "What is this?"}]}],
                      return_audio=False, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4))
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for url in (data_url, str(path)):
        r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}])
        assert r.choices[0].message.content == ref.text


def test_first_audio_delta_leaves_before_the_reply_is_done(client, rt):
    """SSE order: the first audio delta comes while the thinker is still producing text (after the first talker
    frame), not after the reply."""
    n_tokens = 40
    ref = expected(rt, voice="ethan", max_new_tokens=n_tokens)
    assert len(ref.token_ids) == n_tokens       # the thinker runs long (no early <|im_end|>) on this prompt
    order = []
    for chunk in client.chat.completions.create(model="tiny", messages=question_messages(),
                                                modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"},
                                                temperature=0, max_tokens=n_tokens, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.content:
                order.append("text")
            if field(getattr(d, "audio", None), "data"):
                order.append("audio")
    first_audio = order.index("audio")
    assert order[first_audio + 1:].count("text") >= order.count("text") // 2 > 0, order

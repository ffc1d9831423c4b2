"""Corrupt checkpoint files (issue 12 item 4): truncated or garbage safetensors shards, integer/bool weights,
corrupt tokenizer and chat-template files are omni_rt.CheckpointErrors naming the file (and the tensor); a
text-only config over a checkpoint that still ships talker weights loads as text-only with one warning."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

import omni_rt
from omni_rt.testing import make_checkpoint

GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4)
PROMPT = omni_rt.Prompt(token_ids=[449, 11, 198, 5, 6, 450, 198, 449, 12, 198])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("files_src"), "tiny", seed=0)


@pytest.fixture
def ckpt(source, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(source, dst)
    return str(dst)


def shard(path: str) -> str:
    return os.path.join(path, next(f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")))


def load(path: str):
    return omni_rt.Runtime(path, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_shards_name_the_file(ckpt, damage):
    f = shard(ckpt)
    data = open(f, "rb").read()
    new = {"truncated": data[: len(data) // 2], "garbage": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64),
           "empty": b""}[damage]
    with open(f, "wb") as out:
        out.write(new)
    with pytest.raises(omni_rt.CheckpointError, match=os.path.basename(f)):
        load(ckpt)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64])
def test_non_float_weights_name_the_tensor(ckpt, dtype):
    from safetensors.torch import load_file, save_file

    f = shard(ckpt)
    tensors = load_file(f)
    name = "thinker.model.norm.weight"
    assert name in tensors
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(omni_rt.CheckpointError, match=rf"'{name}' in .*{os.path.basename(f)}.*dtype"):
        load(ckpt)


@pytest.mark.parametrize("file, content", [
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": '),
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "NoSuchModel"}}'),
    ("tokenizer_config.json", "{not json"),
    ("tokenizer_config.json", "[1, 2, 3]"),
    ("chat_template.jinja", "{% for message in messages %}{{ message['role'] }"),
    ("chat_template.jinja", b"\xff\xfe\x00 not utf-8 \xc3"),
])
def test_corrupt_tokenizer_and_template_files_name_the_file(ckpt, file, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(os.path.join(ckpt, file), mode) as f:
        f.write(content)
    with pytest.raises(omni_rt.CheckpointError, match=file):
        load(ckpt)


def test_corrupt_chat_template_json(ckpt):
    os.remove(os.path.join(ckpt, "chat_template.jinja"))
    with open(os.path.join(ckpt, "chat_template.json"), "w") as f:
        f.write('{"chat_template": "{% if %}"}')
    with pytest.raises(omni_rt.CheckpointError, match="chat_template.json"):
        load(ckpt)


def test_corrupt_index_names_the_file(ckpt):
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": [1, 2]}')
    with pytest.raises(omni_rt.CheckpointError, match="model.safetensors.index.json"):
        load(ckpt)


def test_text_only_config_over_talker_weights_loads_with_one_warning(ckpt, source):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["enable_audio_output"] = False
    json.dump(cfg, open(cfg_path, "w"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = load(ckpt)
    ours = [w for w in caught if "talker/code2wav tensors are ignored" in str(w.message)]
    assert len(ours) == 1
    with rt:
        assert not rt.has_talker and rt.speakers == []
        out = rt.generate(PROMPT, thinker=GREEDY)
        assert out.audio is None
    with omni_rt.Runtime(source, device="cpu") as full:
        assert full.generate(PROMPT, thinker=GREEDY, return_audio=False).token_ids == out.token_ids

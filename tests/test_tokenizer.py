"""Tokenizer files and chat templates in every layout a HF checkpoint may ship."""
import json
import os
import shutil

import pytest

from omni_rt.testing.tokenizer import CHAT_TEMPLATE, write_tiny_tokenizer
from omni_rt.tokenizer import (IncrementalDetokenizer, OmniTokenizer, TokenizerMissing, expand_audio_pads,
                               split_messages)

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Hi?"}]}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return path


def test_special_ids_and_roles_match_the_tiny_config(tok_dir):
    tok = OmniTokenizer(tok_dir)
    assert tok.token_id("<|im_start|>") == 449 and tok.token_id("<|im_end|>") == 450
    assert tok.token_id("<|audio_pad|>") == 480 and tok.token_id("<|audio_start|>") == 474
    assert tok.encode("user") == [11] and tok.encode("assistant") == [12] and tok.encode("system") == [10]


def test_render_split_and_expand(tok_dir):
    tok = OmniTokenizer(tok_dir)
    msgs, audios = split_messages(MESSAGES)
    assert audios == ["a.wav"]
    text = tok.render(msgs)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|audio_start|>")
    assert text.endswith("<|im_start|>assistant\n")
    ids = expand_audio_pads(tok.encode(text), 480, [5])
    assert ids.count(480) == 5 and tok.decode(ids, skip_special_tokens=False).count("<|audio_pad|>") == 5
    with pytest.raises(ValueError, match="2 audios"):
        expand_audio_pads(tok.encode(text), 480, [5, 6])


def test_vocab_and_merges_layout(tok_dir, tmp_path):
    """A checkpoint with vocab.json + merges.txt (no tokenizer.json) encodes the same way."""
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = data["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path)
    shutil.copy(tok_dir / "chat_template.jinja", tmp_path)
    a, b = OmniTokenizer(tok_dir), OmniTokenizer(tmp_path)
    text = a.render(split_messages(MESSAGES)[0])
    assert a.encode(text) == b.encode(text)
    assert b.decode(b.encode("Café 🙂")) == "Café 🙂"


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_template_sources(tok_dir, tmp_path, where):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(CHAT_TEMPLATE)
    elif where == "chat_template.json":
        (tmp_path / where).write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    else:
        config["chat_template"] = CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert OmniTokenizer(tmp_path).render([{"role": "user", "content": [{"type": "text", "text": "x"}]}]) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_missing_files_and_template(tmp_path, tok_dir):
    with pytest.raises(TokenizerMissing):
        OmniTokenizer(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        OmniTokenizer(tmp_path).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "'image' field"),
    ([{"role": "user", "content": [{"type": "pdf", "pdf": "x"}]}], "'text', 'audio', 'image' or 'video'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "'audio' field"),
])
def test_bad_messages(bad, match):
    with pytest.raises(ValueError, match=match):
        split_messages(bad)


def test_incremental_detokenizer_holds_partial_characters(tok_dir):
    tok = OmniTokenizer(tok_dir)
    ids = tok.encode("naïve 你好🙂!")
    d = IncrementalDetokenizer(tok)
    deltas = [d.push([i]) for i in ids]
    assert "".join(deltas) + d.push([], final=True) == "naïve 你好🙂!"
    assert not any("\ufffd" in x for x in deltas)
    assert IncrementalDetokenizer(None).push([1, 2]) == ""

"""Tokenizer files + chat template → Prompt (token ids with each audio's <|audio_pad|> expanded).

Reads what a HF checkpoint ships: ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``, byte-level BPE as
Qwen's), the chat template from ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``,
and added special tokens from ``tokenizer_config.json``. Uses the ``tokenizers`` library and jinja2.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Sequence

import numpy as np

from .errors import CheckpointError

AUDIO_PAD = "<|audio_pad|>"


class TokenizerMissing(ValueError):
    pass


class OmniTokenizer:
    """The checkpoint's tokenizer and chat template. A file that is present but corrupt (unparseable JSON, a
    tokenizer the library cannot build, a template with a syntax error) is an ``omni_rt.CheckpointError`` naming
    it, raised here at load rather than at the first request."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        self.path = path
        tok_json = os.path.join(path, "tokenizer.json")
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(tok_json):
            with _corrupt(tok_json):
                self.tok = Tokenizer.from_file(tok_json)
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            from tokenizers import decoders, models, pre_tokenizers

            with _corrupt(f"{vocab} / {merges}"):
                self.tok = Tokenizer(models.BPE.from_file(vocab, merges))
            self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.tok.decoder = decoders.ByteLevel()
        else:
            raise TokenizerMissing(f"no tokenizer files in {path} (tokenizer.json, or vocab.json + merges.txt)")
        config = self._read_json("tokenizer_config.json") or {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(config).__name__}")
        added = config.get("added_tokens_decoder", {})
        if added:
            from tokenizers import AddedToken

            with _corrupt(cfg_file, "added_tokens_decoder"):
                self.tok.add_special_tokens([AddedToken(v["content"], special=True) for v in added.values()
                                             if self.tok.token_to_id(v["content"]) is None])
        self.chat_template, self._template_file = self._find_template(config)
        self._template = None
        if self.chat_template is not None:
            import jinja2

            if not isinstance(self.chat_template, str):
                raise CheckpointError(f"the chat template in {self._template_file} must be a string")
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
            env.globals["raise_exception"] = _raise
            with _corrupt(self._template_file, "chat template"):
                self._template = env.from_string(self.chat_template)

    def _read_json(self, name: str) -> Any:
        p = os.path.join(self.path, name)
        if not os.path.isfile(p):
            return None
        with _corrupt(p):
            with open(p, encoding="utf-8") as f:
                return json.load(f)

    def _find_template(self, config: dict) -> tuple[str | None, str]:
        p = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(p):
            with _corrupt(p):
                with open(p, encoding="utf-8") as f:
                    return f.read(), p
        tpl = self._read_json("chat_template.json")
        if isinstance(tpl, dict) and tpl.get("chat_template"):
            return tpl["chat_template"], os.path.join(self.path, "chat_template.json")
        return config.get("chat_template"), os.path.join(self.path, "tokenizer_config.json")

    # ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in this tokenizer")
        return i

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (audio parts become one <|audio_pad|> each)."""
        if self._template is None:
            raise ValueError(f"the tokenizer in {self.path} has no chat template; pass an omni_rt.Prompt instead")
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:  # e.g. a field the template needs is missing from a message
            raise ValueError(f"the chat template ({self._template_file}) cannot render these messages: "
                             f"{type(e).__name__}: {e}") from None


def _raise(message: str):
    raise ValueError(message)


@contextlib.contextmanager
def _corrupt(file: str, what: str = ""):
    """Any error while reading/parsing ``file`` becomes a CheckpointError naming it."""
    try:
        yield
    except (CheckpointError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # json, jinja2, decoding; tokenizers' Rust panics are pyo3 BaseExceptions
        raise CheckpointError(f"{file}{f' ({what})' if what else ''} is corrupt or unreadable: "
                              f"{type(e).__name__}: {e}") from None


def split_messages(messages: Any) -> tuple[list[dict], list[Any]]:
    """Validate chat messages; returns (messages with string content normalised to parts, audios in order)."""
    out, media = split_media(messages)
    return out, [part["audio"] for kind, part in media if kind == "audio"]


def split_media(messages: Any) -> tuple[list[dict], list[tuple[str, dict]]]:
    """Validate chat messages; returns (messages with string content normalised to parts, [(kind, part)] for
    every audio / image / video part in order of appearance)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    media, out = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system/user/assistant, got {m['role']!r}")
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("audio", "image", "video"):
                if kind not in part:
                    raise ValueError(f"message {i} part {j}: an {kind} part needs an '{kind}' field "
                                     f"(path or array)")
                media.append((kind, part))
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} part {j}: a text part needs a string 'text'")
            else:
                raise ValueError(f"message {i} part {j}: type must be 'text', 'audio', 'image' or 'video', "
                                 f"got {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out, media


def expand_audio_pads(ids: list[int], audio_pad_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the k-th <|audio_pad|> token by counts[k] copies (what the HF processor does)."""
    positions = [i for i, t in enumerate(ids) if t == audio_pad_id]
    if len(positions) != len(counts):
        raise ValueError(f"the chat template produced {len(positions)} audio placeholders for {len(counts)} audios")
    out: list[int] = []
    last = 0
    for pos, n in zip(positions, counts):
        out.extend(ids[last:pos])
        out.extend([audio_pad_id] * int(n))
        last = pos + 1
    out.extend(ids[last:])
    return out


class IncrementalDetokenizer:
    """Text deltas whose concatenation equals decode(all ids), even when a character spans several tokens:
    text is released only up to the last complete character (a trailing U+FFFD means an incomplete one)."""

    def __init__(self, tokenizer: OmniTokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(int(i) for i in new_ids)
        text = self.tokenizer.decode(self.ids)
        if not final:
            while text.endswith("\ufffd"):
                text = text[:-1]
        if not text.startswith(self.emitted):
            # Byte-level BPE decodes a prefix of ids to a prefix of the text once incomplete characters are
            # held back, so this only happens with exotic decoders: hold the text until it is consistent.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


"""A small byte-level BPE tokenizer in the tiny checkpoint's remapped id space, with a Qwen3-Omni-style chat
template, so chat messages work end to end on synthetic checkpoints.

Ids: 448 + (real − 151643) for the special tokens (<|im_start|> 449, <|audio_pad|> 480, …), and the words
"system", "user", "assistant" are single tokens with the ids the tiny config uses (10, 11, 12).
"""
from __future__ import annotations

import json
import os

SPECIAL_BASE = 448
# Qwen2/3 special tokens from id 151643 upwards, in order.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
ROLE_IDS = {"system": 10, "user": 11, "assistant": 12}

# The structure of Qwen3-Omni's template: text parts inline, each audio / image / video part as one placeholder
# block that the runtime expands to the medium's token count.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """The weather today is sunny with a light breeze from the west. What is the weather like today?
Please answer briefly. I can hear you clearly. Thank you for asking, it is a pleasant afternoon.
The quick brown fox jumps over the lazy dog. Streaming speech synthesis turns text into audio frame by frame.
system user assistant system user assistant. Hello, how are you? Fine, thanks! Numbers: 0 1 2 3 4 5 6 7 8 9.
Café, naïve, déjà vu — 你好，世界。 Ünïcödé tëxt with àccents and emoji 🙂 must round-trip exactly.
"""


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 512) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    base = SPECIAL_BASE
    if vocab_size < base + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {base + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 50 + ["system\nuser\nassistant\n"] * 400, trainer=trainer)
    vocab: dict[str, int] = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    # Pin the role words to the ids the tiny config uses (swap with whatever token held those ids).
    by_id = {i: t for t, i in vocab.items()}
    for word, want in ROLE_IDS.items():
        if word not in vocab:
            raise RuntimeError(f"the training corpus did not make {word!r} a single token")
        have, other = vocab[word], by_id[want]
        vocab[word], vocab[other] = want, have
        by_id[want], by_id[have] = word, other
    # Fill up to the special base so special ids land exactly at 448 + offset.
    filler = [f"<|reserved_{i}|>" for i in range(len(vocab), base)]
    for i, name in enumerate(filler):
        vocab[name] = len(by_id) + i
    merge_pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    model = models.BPE(vocab=vocab, merges=merge_pairs)
    out = Tokenizer(model)
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for offset, t in enumerate(SPECIAL_TOKENS):
        assert out.token_to_id(t) == base + offset, (t, out.token_to_id(t))
    os.makedirs(path, exist_ok=True)
    out.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 65536, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(base + i): {"content": t, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)

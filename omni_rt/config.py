"""Validated configuration dataclasses built from a checkpoint's ``config.json``.

This is the one module that knows the JSON field names. Every size is read from the file (the transformers
config classes' defaults are not the released model). A missing or wrong field raises ``ConfigError`` naming
the field by its dotted path, e.g. ``thinker_config.text_config.num_experts``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from .errors import ConfigError

_MISSING = object()


class _Reader:
    """Reads fields from one JSON object, naming the dotted path in every error."""

    def __init__(self, data: Mapping[str, Any], path: str):
        if not isinstance(data, Mapping):
            raise ConfigError(f"config field '{path}' must be an object, got {type(data).__name__}")
        self.data, self.path = data, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple = int, default: Any = _MISSING, *, positive: bool = False,
            nonneg: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise ConfigError(f"config field '{self._name(key)}' is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ConfigError(f"config field '{self._name(key)}' must be {names}, got {value!r}")
        if positive and not value > 0:
            raise ConfigError(f"config field '{self._name(key)}' must be > 0, got {value!r}")
        if nonneg and value < 0:
            raise ConfigError(f"config field '{self._name(key)}' must be >= 0, got {value!r}")
        return value

    def int_list(self, key: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self.get(key, (list, tuple), default)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config field '{self._name(key)}' must be a list of integers, got {value!r}")
        return tuple(value)

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.get(key, dict), self._name(key))

    def rope(self) -> "_Reader":
        # transformers 5 writes rope_parameters; older files had rope_theta at the top level.
        if isinstance(self.data.get("rope_parameters"), Mapping):
            return self.sub("rope_parameters")
        return self

    def check(self, ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config field '{self._name(key)}' {why}")


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """AuT: Whisper-style conv front end + windowed transformer (thinker_config.audio_config)."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    downsample_hidden_size: int
    output_dim: int
    n_window: int
    n_window_infer: int
    conv_chunksize: int
    max_source_positions: int
    activation_function: str

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @classmethod
    def from_json(cls, r: _Reader) -> "AudioEncoderConfig":
        c = cls(
            num_mel_bins=r.get("num_mel_bins", positive=True), d_model=r.get("d_model", positive=True),
            encoder_layers=r.get("encoder_layers", positive=True),
            encoder_attention_heads=r.get("encoder_attention_heads", positive=True),
            encoder_ffn_dim=r.get("encoder_ffn_dim", positive=True),
            downsample_hidden_size=r.get("downsample_hidden_size", positive=True),
            output_dim=r.get("output_dim", positive=True), n_window=r.get("n_window", positive=True),
            n_window_infer=r.get("n_window_infer", positive=True),
            conv_chunksize=r.get("conv_chunksize", positive=True),
            max_source_positions=r.get("max_source_positions", positive=True),
            activation_function=r.get("activation_function", str, "gelu"),
        )
        r.check(c.d_model % c.encoder_attention_heads == 0, "d_model", "must be divisible by encoder_attention_heads")
        # Window boundaries are whole conv chunks: n_window_infer must be a multiple of the chunk (2*n_window).
        r.check(c.n_window_infer % (2 * c.n_window) == 0, "n_window_infer", "must be a multiple of 2*n_window")
        # What the AuT module needs (checked here so a bad config fails at load with the field's name):
        r.check(c.activation_function == "gelu", "activation_function", f"must be 'gelu', got {c.activation_function!r}")
        r.check(c.d_model % 2 == 0, "d_model", "must be even (sinusoidal positions)")
        tokens = 2 * c.n_window
        for _ in range(3):  # three stride-2 convs; the reference hard-codes 13 tokens per full chunk
            tokens = (tokens - 1) // 2 + 1
        r.check(tokens == 13, "n_window", f"must give 13 tokens per 2*n_window-frame chunk like the released "
                f"model (n_window 50), got {c.n_window} -> {tokens}")
        return c


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Qwen3 MoE decoder (thinker text model or talker text model)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    max_position_embeddings: int
    hidden_act: str

    def is_moe_layer(self, layer: int) -> bool:
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_json(cls, r: _Reader, *, experts_key: str, shared_expert_required: bool) -> "DecoderConfig":
        rope = r.rope()
        heads = r.get("num_attention_heads", positive=True)
        hidden = r.get("hidden_size", positive=True)
        c = cls(
            vocab_size=r.get("vocab_size", positive=True), hidden_size=hidden,
            num_hidden_layers=r.get("num_hidden_layers", positive=True), num_attention_heads=heads,
            num_key_value_heads=r.get("num_key_value_heads", positive=True),
            head_dim=r.get("head_dim", int, hidden // heads, positive=True),
            intermediate_size=r.get("intermediate_size", positive=True),
            rms_norm_eps=r.get("rms_norm_eps", float, positive=True),
            rope_theta=rope.get("rope_theta", float, positive=True),
            mrope_section=rope.int_list("mrope_section", (24, 20, 20)),
            num_experts=r.get(experts_key, positive=True),
            num_experts_per_tok=r.get("num_experts_per_tok", positive=True),
            moe_intermediate_size=r.get("moe_intermediate_size", positive=True),
            norm_topk_prob=r.get("norm_topk_prob", bool, True),
            shared_expert_intermediate_size=(r.get("shared_expert_intermediate_size", nonneg=True)
                                             if shared_expert_required
                                             else r.get("shared_expert_intermediate_size", int, 0, nonneg=True)),
            decoder_sparse_step=r.get("decoder_sparse_step", int, 1, positive=True),
            mlp_only_layers=r.int_list("mlp_only_layers", ()),
            max_position_embeddings=r.get("max_position_embeddings", positive=True),
            hidden_act=r.get("hidden_act", str, "silu"),
        )
        r.check(heads % c.num_key_value_heads == 0, "num_key_value_heads", "must divide num_attention_heads")
        r.check(c.num_experts_per_tok <= c.num_experts, "num_experts_per_tok", "must be <= the number of experts")
        r.check(c.head_dim % 2 == 0, "head_dim", "must be even (rotary halves)")
        rope.check(len(c.mrope_section) == 3 and sum(c.mrope_section) == c.head_dim // 2, "mrope_section",
                   f"must be 3 integers summing to head_dim/2 = {c.head_dim // 2}, got {list(c.mrope_section)}")
        r.check(c.hidden_act == "silu", "hidden_act", f"must be 'silu', got {c.hidden_act!r}")
        return c


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """The ViT with 2x2 patch merger and deepstack taps (thinker_config.vision_config)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size ** 2

    @classmethod
    def from_json(cls, r: _Reader) -> "VisionEncoderConfig":
        rope = r.data.get("rope_parameters")
        theta = r.sub("rope_parameters").get("rope_theta", float, 10000.0, positive=True) \
            if isinstance(rope, Mapping) else 10000.0  # transformers' axial-rope default
        c = cls(
            depth=r.get("depth", positive=True), hidden_size=r.get("hidden_size", positive=True),
            intermediate_size=r.get("intermediate_size", positive=True),
            num_heads=r.get("num_heads", positive=True), in_channels=r.get("in_channels", int, 3, positive=True),
            patch_size=r.get("patch_size", positive=True),
            temporal_patch_size=r.get("temporal_patch_size", int, 2, positive=True),
            spatial_merge_size=r.get("spatial_merge_size", int, 2, positive=True),
            out_hidden_size=r.get("out_hidden_size", positive=True),
            num_position_embeddings=r.get("num_position_embeddings", positive=True),
            deepstack_visual_indexes=r.int_list("deepstack_visual_indexes", ()),
            hidden_act=r.get("hidden_act", str, "gelu_pytorch_tanh"), rope_theta=theta,
        )
        r.check(c.hidden_size % c.num_heads == 0 and c.head_dim % 4 == 0, "num_heads",
                "must divide hidden_size into heads whose size is a multiple of 4 (2-D rotary)")
        side = int(c.num_position_embeddings ** 0.5)
        r.check(side * side == c.num_position_embeddings, "num_position_embeddings", "must be a square")
        r.check(all(0 <= i < c.depth for i in c.deepstack_visual_indexes), "deepstack_visual_indexes",
                f"must be layer indices in [0, {c.depth})")
        r.check(c.hidden_act in ("gelu_pytorch_tanh", "gelu"), "hidden_act",
                f"must be 'gelu_pytorch_tanh' or 'gelu', got {c.hidden_act!r}")
        return c


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    audio: AudioEncoderConfig
    text: DecoderConfig
    vision: VisionEncoderConfig | None  # None: a checkpoint without a vision tower (images are refused)
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: int
    seconds_per_chunk: int

    @classmethod
    def from_json(cls, r: _Reader, top: _Reader) -> "ThinkerConfig":
        return cls(
            audio=AudioEncoderConfig.from_json(r.sub("audio_config")),
            text=DecoderConfig.from_json(r.sub("text_config"), experts_key="num_experts",
                                         shared_expert_required=False),
            vision=(VisionEncoderConfig.from_json(r.sub("vision_config"))
                    if isinstance(r.data.get("vision_config"), Mapping) else None),
            audio_token_id=r.get("audio_token_id", nonneg=True),
            audio_start_token_id=r.get("audio_start_token_id", nonneg=True),
            audio_end_token_id=r.get("audio_end_token_id", int, top.get("audio_end_token_id", int, 151670)),
            image_token_id=r.get("image_token_id", nonneg=True),
            video_token_id=r.get("video_token_id", nonneg=True),
            vision_start_token_id=r.get("vision_start_token_id", nonneg=True),
            vision_end_token_id=r.get("vision_end_token_id", int, r.get("vision_start_token_id", nonneg=True) + 1),
            position_id_per_seconds=r.get("position_id_per_seconds", int, 25, positive=True),
            seconds_per_chunk=r.get("seconds_per_chunk", int, 2, positive=True),
        )


@dataclasses.dataclass(frozen=True)
class CodePredictorConfig:
    """The dense MTP decoder that adds codebooks 1..G-1 to each frame."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    num_code_groups: int

    @classmethod
    def from_json(cls, r: _Reader, num_code_groups: int) -> "CodePredictorConfig":
        heads = r.get("num_attention_heads", positive=True)
        c = cls(
            vocab_size=r.get("vocab_size", positive=True), hidden_size=r.get("hidden_size", positive=True),
            intermediate_size=r.get("intermediate_size", positive=True),
            num_hidden_layers=r.get("num_hidden_layers", positive=True), num_attention_heads=heads,
            num_key_value_heads=r.get("num_key_value_heads", positive=True),
            head_dim=r.get("head_dim", positive=True), rms_norm_eps=r.get("rms_norm_eps", float, positive=True),
            rope_theta=r.rope().get("rope_theta", float, positive=True), num_code_groups=num_code_groups,
        )
        r.check(heads % c.num_key_value_heads == 0, "num_key_value_heads", "must divide num_attention_heads")
        return c


@dataclasses.dataclass(frozen=True)
class TalkerConfig:
    text: DecoderConfig
    code_predictor: CodePredictorConfig
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speaker_id: Mapping[str, int]
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    audio_start_token_id: int
    position_id_per_seconds: int
    spatial_merge_size: int

    def speaker(self, name: str) -> int:
        """Codec id of a speaker, case-insensitive; unknown names list the valid ones."""
        table = {k.lower(): v for k, v in self.speaker_id.items()}
        if not isinstance(name, str) or name.lower() not in table:
            raise ValueError(f"unknown speaker {name!r}; this checkpoint has: {', '.join(sorted(table))}")
        return table[name.lower()]

    @classmethod
    def from_json(cls, r: _Reader) -> "TalkerConfig":
        groups = r.get("num_code_groups", positive=True)
        speakers = r.get("speaker_id", dict)
        r.check(len(speakers) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                          for v in speakers.values()), "speaker_id",
                "must map at least one speaker name to a non-negative integer codec id")
        c = cls(
            text=DecoderConfig.from_json(r.sub("text_config"), experts_key="num_local_experts"
                                         if "num_local_experts" in r.data.get("text_config", {}) else "num_experts",
                                         shared_expert_required=True),
            code_predictor=CodePredictorConfig.from_json(r.sub("code_predictor_config"), groups),
            num_code_groups=groups, thinker_hidden_size=r.get("thinker_hidden_size", positive=True),
            accept_hidden_layer=r.get("accept_hidden_layer", nonneg=True),
            codec_pad_id=r.get("codec_pad_id", nonneg=True), codec_bos_id=r.get("codec_bos_id", nonneg=True),
            codec_eos_token_id=r.get("codec_eos_token_id", nonneg=True),
            codec_nothink_id=r.get("codec_nothink_id", nonneg=True),
            codec_think_bos_id=r.get("codec_think_bos_id", nonneg=True),
            codec_think_eos_id=r.get("codec_think_eos_id", nonneg=True),
            speaker_id=dict(speakers), audio_token_id=r.get("audio_token_id", nonneg=True),
            image_token_id=r.get("image_token_id", nonneg=True), video_token_id=r.get("video_token_id", nonneg=True),
            vision_start_token_id=r.get("vision_start_token_id", nonneg=True),
            audio_start_token_id=r.get("audio_start_token_id", nonneg=True),
            position_id_per_seconds=r.get("position_id_per_seconds", positive=True),
            spatial_merge_size=r.get("spatial_merge_size", positive=True),
        )
        cp = r.sub("code_predictor_config")
        cp.check(c.code_predictor.vocab_size >= 1, "vocab_size", "must be >= 1")
        r.check(groups >= 2, "num_code_groups", "must be >= 2")
        return c


@dataclasses.dataclass(frozen=True)
class Code2WavConfig:
    codebook_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    layer_scale_initial_scale: float
    rms_norm_eps: float
    rope_theta: float
    num_quantizers: int
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    decoder_dim: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_upsample(self) -> int:
        """Output samples per code frame (1920 for the released model: 8*5*4*3 * 2*2)."""
        n = 1
        for f in self.upsample_rates + self.upsampling_ratios:
            n *= f
        return n

    @classmethod
    def from_json(cls, r: _Reader) -> "Code2WavConfig":
        c = cls(
            codebook_size=r.get("codebook_size", positive=True), hidden_size=r.get("hidden_size", positive=True),
            intermediate_size=r.get("intermediate_size", positive=True),
            num_hidden_layers=r.get("num_hidden_layers", positive=True),
            num_attention_heads=r.get("num_attention_heads", positive=True),
            num_key_value_heads=r.get("num_key_value_heads", positive=True),
            sliding_window=r.get("sliding_window", positive=True),
            layer_scale_initial_scale=r.get("layer_scale_initial_scale", float),
            rms_norm_eps=r.get("rms_norm_eps", float, positive=True),
            rope_theta=r.rope().get("rope_theta", float, positive=True),
            num_quantizers=r.get("num_quantizers", positive=True),
            upsample_rates=r.int_list("upsample_rates"), upsampling_ratios=r.int_list("upsampling_ratios"),
            decoder_dim=r.get("decoder_dim", positive=True),
            max_position_embeddings=r.get("max_position_embeddings", positive=True),
        )
        r.check(c.hidden_size % c.num_attention_heads == 0, "hidden_size", "must be divisible by num_attention_heads")
        r.check(c.decoder_dim % (2 ** len(c.upsample_rates)) == 0, "decoder_dim",
                "must halve cleanly once per upsample rate")
        return c


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """``config.json`` ``quantization_config`` of a block-FP8 checkpoint (Qwen's FP8 release format).

    Only what the kernels run is accepted: ``quant_method`` "fp8", ``fmt`` "e4m3", ``activation_scheme``
    "dynamic" (activation scales are computed at run time, none are stored) and ``weight_block_size``
    [128, 128]. ``modules_to_not_convert`` lists module names (``thinker.lm_head``) kept in the compute dtype.
    """

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)
    modules_to_not_convert: tuple[str, ...] = ()

    def keeps(self, module: str) -> bool:
        """Whether ``module`` is listed as not converted (names match as given or as a dotted suffix,
        since some files list ``model.layers.0.mlp.gate`` for ``thinker.model.layers.0.mlp.gate``)."""
        return any(module == m or module.endswith("." + m) for m in self.modules_to_not_convert)

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "fmt": self.fmt, "activation_scheme": self.activation_scheme,
                "weight_block_size": list(self.weight_block_size),
                "modules_to_not_convert": list(self.modules_to_not_convert)}

    @classmethod
    def from_json(cls, r: _Reader) -> "QuantizationConfig":
        method = r.get("quant_method", str)
        r.check(method == "fp8", "quant_method", f"must be 'fp8' (block-FP8), got {method!r}")
        fmt = r.get("fmt", str, "e4m3")
        r.check(fmt == "e4m3", "fmt", f"must be 'e4m3' (float8_e4m3fn weights), got {fmt!r}")
        scheme = r.get("activation_scheme", str, "dynamic")
        r.check(scheme == "dynamic", "activation_scheme",
                f"must be 'dynamic' (no stored activation scales are supported), got {scheme!r}")
        block = r.int_list("weight_block_size")
        r.check(block == (128, 128), "weight_block_size", f"must be [128, 128] (the kernels' block), got "
                f"{list(block)}")
        skip = r.get("modules_to_not_convert", (list, tuple), ())
        r.check(all(isinstance(m, str) for m in skip), "modules_to_not_convert", "must be a list of strings")
        return cls(method, fmt, scheme, block, tuple(skip))


@dataclasses.dataclass(frozen=True)
class OmniConfig:
    """A whole Qwen3-Omni checkpoint. ``talker``/``code2wav`` are None for text-only checkpoints."""

    thinker: ThinkerConfig
    talker: TalkerConfig | None
    code2wav: Code2WavConfig | None
    enable_audio_output: bool
    im_start_token_id: int
    im_end_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int
    quantization: QuantizationConfig | None = None
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def has_talker(self) -> bool:
        return self.talker is not None and self.code2wav is not None

    @property
    def kind(self) -> str:
        """Which released checkpoint this one is shaped like: "Instruct" (a talker: speech out), "Thinking" (text
        out, a vision tower) or "Captioner" (text out, audio in only). Read from the config: a name that says
        Captioner (``_name_or_path`` / ``name_or_path``), else the Captioner's shape — no talker and no
        ``thinker_config.vision_config``."""
        names = " ".join(str(self.raw.get(k, "")) for k in ("_name_or_path", "name_or_path")).lower()
        if "captioner" in names:
            return "Captioner"
        if self.has_talker:
            return "Instruct"
        return "Thinking" if self.thinker.vision is not None else "Captioner"

    def vision_refusal(self) -> str | None:
        """Why this checkpoint takes no images or video (None when it takes them): no vision tower, or a
        Captioner (audio in only, whatever its config carries)."""
        if self.kind == "Captioner":
            return ("this is a Captioner checkpoint (audio in, text out): it takes no images or video"
                    + (" (it has no vision tower: thinker_config.vision_config is absent)"
                       if self.thinker.vision is None else ""))
        if self.thinker.vision is None:
            return (f"this {self.kind} checkpoint has no vision tower (thinker_config.vision_config is absent), "
                    f"so it cannot take images or video")
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OmniConfig":
        top = _Reader(data, "")
        model_type = top.get("model_type", str, "qwen3_omni_moe")
        top.check(model_type == "qwen3_omni_moe", "model_type", f"must be 'qwen3_omni_moe', got {model_type!r}")
        enable_audio = top.get("enable_audio_output", bool, True)
        talker = code2wav = None
        # Thinking/Captioner checkpoints (or enable_audio_output: false) are text-only models.
        if enable_audio and isinstance(data.get("talker_config"), Mapping) and isinstance(
                data.get("code2wav_config"), Mapping):
            talker = TalkerConfig.from_json(top.sub("talker_config"))
            code2wav = Code2WavConfig.from_json(top.sub("code2wav_config"))
        c = cls(
            thinker=ThinkerConfig.from_json(top.sub("thinker_config"), top), talker=talker, code2wav=code2wav,
            enable_audio_output=enable_audio and talker is not None,
            im_start_token_id=top.get("im_start_token_id", int, 151644),
            im_end_token_id=top.get("im_end_token_id", int, 151645),
            tts_pad_token_id=top.get("tts_pad_token_id", int, 151671),
            tts_bos_token_id=top.get("tts_bos_token_id", int, 151672),
            tts_eos_token_id=top.get("tts_eos_token_id", int, 151673),
            system_token_id=top.get("system_token_id", int, 8948),
            user_token_id=top.get("user_token_id", int, 872),
            assistant_token_id=top.get("assistant_token_id", int, 77091),
            quantization=(QuantizationConfig.from_json(top.sub("quantization_config"))
                          if data.get("quantization_config") is not None else None),
            raw=dict(data),
        )
        if talker is not None:
            t = top.sub("talker_config")
            t.check(talker.thinker_hidden_size == c.thinker.text.hidden_size, "thinker_hidden_size",
                    f"must equal thinker hidden_size {c.thinker.text.hidden_size}")
            t.check(talker.accept_hidden_layer <= c.thinker.text.num_hidden_layers, "accept_hidden_layer",
                    f"must be <= thinker num_hidden_layers {c.thinker.text.num_hidden_layers}")
            t.check(talker.num_code_groups == code2wav.num_quantizers, "num_code_groups",
                    f"must equal code2wav_config.num_quantizers {code2wav.num_quantizers}")
        c._check_ids()
        return c

    def _check_ids(self) -> None:
        """Every special token id must index its vocabulary: thinker ids the thinker's, codec and speaker ids
        the talker's. An id outside would only fail at the first request, inside the engine."""
        vocab = self.thinker.text.vocab_size
        th = self.thinker
        thinker_ids = {
            "im_start_token_id": self.im_start_token_id, "im_end_token_id": self.im_end_token_id,
            "tts_pad_token_id": self.tts_pad_token_id, "tts_bos_token_id": self.tts_bos_token_id,
            "tts_eos_token_id": self.tts_eos_token_id, "system_token_id": self.system_token_id,
            "user_token_id": self.user_token_id, "assistant_token_id": self.assistant_token_id,
            "thinker_config.audio_token_id": th.audio_token_id,
            "thinker_config.audio_start_token_id": th.audio_start_token_id,
            "thinker_config.audio_end_token_id": th.audio_end_token_id,
            "thinker_config.image_token_id": th.image_token_id, "thinker_config.video_token_id": th.video_token_id,
            "thinker_config.vision_start_token_id": th.vision_start_token_id,
        }
        codec_ids: dict[str, int] = {}
        if self.talker is not None:
            t = self.talker
            thinker_ids.update({
                "talker_config.audio_token_id": t.audio_token_id, "talker_config.image_token_id": t.image_token_id,
                "talker_config.video_token_id": t.video_token_id,
                "talker_config.vision_start_token_id": t.vision_start_token_id,
                "talker_config.audio_start_token_id": t.audio_start_token_id,
            })
            codec_ids = {f"talker_config.{k}": getattr(t, k) for k in (
                "codec_pad_id", "codec_bos_id", "codec_eos_token_id", "codec_nothink_id", "codec_think_bos_id",
                "codec_think_eos_id")}
            codec_ids.update({f"talker_config.speaker_id.{k}": v for k, v in t.speaker_id.items()})
        for name, value in thinker_ids.items():
            if not 0 <= value < vocab:
                raise ConfigError(f"config field '{name}' = {value} is outside the thinker vocabulary "
                                  f"[0, {vocab}) (thinker_config.text_config.vocab_size)")
        if self.talker is not None:
            tv = self.talker.text.vocab_size
            for name, value in codec_ids.items():
                if not 0 <= value < tv:
                    raise ConfigError(f"config field '{name}' = {value} is outside the talker vocabulary "
                                      f"[0, {tv}) (talker_config.text_config.vocab_size)")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OmniConfig":
        """Parse ``path`` (a config.json, or a checkpoint directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

"""Random-weight checkpoints in the exact HF on-disk layout (``make_checkpoint``) or straight in memory.

Init is unit-gain (std ≈ 1/sqrt(fan_in), norms ≈ 1): transformers' 0.02-std init makes a small model nearly an
identity map, which tests nothing. Every tensor is drawn from its own generator seeded by (seed, name), so a
tensor's values do not depend on which shard it lands in or on the order tensors are made in.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from typing import Callable, Iterator

import torch

from ..config import OmniConfig
from ..config import QuantizationConfig
from ..layout import checkpoint_layout, is_scale, model_layout
from ..quant import is_fp8_eligible, module_name, quantize_blockwise, scale_name
from .configs import resolve_config

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


def _init_rule(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, scale) for a tensor: kind is "normal" (mean 0), "ones" (1 + scale·noise) or "zeros"+noise."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("code2wav.decoder") and leaf in ("alpha", "beta"):
        return "normal", 0.05          # SnakeBeta log-α/β near 0: unit-std values give gains up to ~e⁶
    if leaf in ("scale", "gamma"):
        return "ones_scaled", 0.1       # LayerScale / ConvNeXt γ: damped residual branches
    if leaf == "bias":
        return "normal", 0.02
    is_norm = "norm" in name or "ln_" in name
    if is_norm and len(shape) == 1:
        return "ones", 0.1
    if name.endswith("patch_embed.proj.weight"):
        return "normal", 1.0 / math.sqrt(math.prod(shape[1:]))  # a conv over 3·2·16·16 inputs, not a table
    if "embed" in name or "embedding" in name:
        return "normal", 1.0
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        if ".conv.weight" in name and name.startswith("code2wav.") and (
                ".upsample." in name and ".0.conv" in name or ".block.1.conv" in name):
            fan_in = shape[0] * shape[2]   # ConvTranspose1d weight is (in, out, k)
        gain = 1.0
        if name.startswith("code2wav.decoder") and ("conv2.conv" in name):
            gain = 0.3                     # residual-unit output: keep the vocoder's signal from blowing up
        if name.startswith("code2wav.decoder") and name.endswith(".conv.weight") and shape[0] == 1:
            gain = 1.0                     # output conv: RMS ~0.07 on tiny speech, peaks ~0.45 (inside clamp(-1, 1))
        return "normal", gain / math.sqrt(fan_in)
    return "normal", 0.02


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The deterministic random value of one on-disk tensor."""
    kind, scale = _init_rule(name, shape)
    g = _generator(seed, name)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "ones":
        t = 1.0 + scale * t
    elif kind == "ones_scaled":
        t = scale * (1.0 + 0.1 * t)
    else:
        t = scale * t
    return t.to(device=device, dtype=dtype)


def _shards(layout: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in layout.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def make_checkpoint(path: str | os.PathLike, config: str | dict | os.PathLike = "tiny", seed: int = 0,
                    dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 << 30,
                    progress: Callable[[str], None] | None = None, with_tokenizer: bool | None = None,
                    quantization: str | None = None) -> str:
    """Write a random-weight checkpoint that transformers' ``from_pretrained`` loads with no missing keys.

    config: "tiny" | "small" | "full-1layer" | "full" | a config dict | a path to config.json.
    Writes config.json, one or more ``model-XXXXX-of-YYYYY.safetensors`` (or ``model.safetensors``) and, when
    sharded, ``model.safetensors.index.json``. Returns the directory. Memory use is bounded by one shard.
    with_tokenizer (default: when the thinker vocab is the remapped 512-token space of tiny/small) also writes a
    small byte-level BPE tokenizer and chat template (``omni_rt.testing.tokenizer``).
    quantization="fp8" writes Qwen's block-FP8 format: ``quantization_config`` in config.json, FP8-eligible
    weights (``omni_rt.quant.is_fp8_eligible``) as float8_e4m3fn codes with fp32 ``*.weight_scale_inv`` grids —
    the quantization of exactly the ``dtype`` tensors the unquantized checkpoint of the same seed holds — and
    every other matrix listed in ``modules_to_not_convert``.
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
    cfg_dict = resolve_config(config)
    cfg_dict["dtype"] = _DTYPE_NAMES[dtype]
    cfg_dict.setdefault("thinker_config", {})["dtype"] = _DTYPE_NAMES[dtype]
    cfg_dict.pop("quantization_config", None)
    if quantization == "fp8":
        plain = checkpoint_layout(OmniConfig.from_dict(cfg_dict))
        keep = [module_name(n) for n, shape in plain.items()
                if n.endswith(".weight") and len(shape) == 2 and not is_fp8_eligible(n)]
        cfg_dict["quantization_config"] = QuantizationConfig(modules_to_not_convert=tuple(keep)).to_json()
    cfg = OmniConfig.from_dict(cfg_dict)
    full_layout = checkpoint_layout(cfg)
    layout = {n: s for n, s in full_layout.items() if not is_scale(n)}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f, indent=2)

    if with_tokenizer is None:
        with_tokenizer = cfg.thinker.text.vocab_size == 512
    if with_tokenizer:
        from .tokenizer import write_tiny_tokenizer

        write_tiny_tokenizer(path, cfg.thinker.text.vocab_size)

    if cfg.thinker.vision is not None:
        _write_preprocessor_config(path, cfg.thinker.vision)

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(layout, itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    total = 0
    start = time.perf_counter()
    for file, shard in zip(names, shards):
        tensors = {}
        for n in shard:
            t = random_tensor(n, layout[n], seed, dtype)
            if scale_name(n) in full_layout:
                t, tensors[scale_name(n)] = quantize_blockwise(t)
            tensors[n] = t
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in tensors})
        del tensors
        if progress:
            progress(f"wrote {file} ({total / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s)")
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


def _write_preprocessor_config(path: str, v) -> None:
    """The released checkpoint's preprocessor_config.json, with this config's patch geometry."""
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3OmniMoeProcessor",
           "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "do_convert_rgb": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "min_pixels": 3136, "max_pixels": 12845056, "patch_size": v.patch_size,
           "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size}
    with open(os.path.join(path, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(pre, f, indent=2)


def random_state_dict(config: str | dict | OmniConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (model parameter name, tensor) built directly on ``device``, experts already stacked.

    For full-size benchmarks: the released shapes are ~70 GB in bf16, too bulky to write to disk. Values are
    drawn on the device with a per-tensor seed (not bit-identical to ``make_checkpoint``'s CPU draws).
    """
    cfg = config if isinstance(config, OmniConfig) else OmniConfig.from_dict(resolve_config(config))
    disk = checkpoint_layout(cfg)
    for name, shape in model_layout(cfg).items():
        if name in disk:
            kind_name, probe_shape = name, shape
        else:  # stacked experts: draw with the rule of one expert's tensor
            prefix, proj = name.rsplit(".", 1)
            kind_name = f"{prefix}.0.{'gate_proj' if proj == 'gate_up_proj' else 'down_proj'}.weight"
            probe_shape = disk[kind_name]
        kind, scale = _init_rule(kind_name, probe_shape)
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, 1.0, generator=g)
        if kind == "ones":
            t.mul_(scale).add_(1.0)
        elif kind == "ones_scaled":
            t.mul_(0.1 * scale).add_(scale)
        else:
            t.mul_(scale)
        yield name, t


__all__ = ["make_checkpoint", "random_state_dict", "random_tensor"]


def build_synthetic_model(config, dtype: torch.dtype, device: str | torch.device, seed: int = 0,
                          with_talker: bool = True, fp8: bool = False) -> OmniModel:
    """Random weights of a named/dict config built directly on ``device`` (no files): for full-size benchmarks,
    where writing ~70 GB of bf16 to disk would be slow and bulky. ``fp8``: eligible weights quantized to
    block FP8 as they are drawn, and kept FP8."""
    from ..loader import assign_parameters
    from ..models.omni import OmniModel
    from .configs import resolve_config

    cfg = config if isinstance(config, OmniConfig) else OmniConfig.from_dict(resolve_config(config))
    with torch.device("meta"):
        model = OmniModel(cfg, with_talker=with_talker, fp8=fp8)
    wanted = ("thinker.",) + (("talker.", "code2wav.") if model.has_talker else ())
    weights = ((n, t) for n, t in random_state_dict(cfg, seed, dtype, device) if n.startswith(wanted))
    if fp8:
        weights = _quantized(weights, set(dict(model.named_parameters())))
    assign_parameters(model, weights, strict=True)
    return model.eval()


def _quantized(weights, params: set[str]):
    """(name, tensor) stream → FP8 codes + scales for every parameter that has a ``*_scale_inv`` slot (a part of a
    fused q/k/v or gate/up parameter on its own grid: ``assign_parameters`` stacks the parts' grids)."""
    from ..layout import fused_target
    from ..quant import quantize_blockwise, quantize_parts, scale_name

    for name, t in weights:
        fused = fused_target(name)
        if scale_name(fused[0] if fused is not None else name) not in params:
            yield name, t
            continue
        if name.endswith("gate_up_proj"):
            half = t.shape[-2] // 2
            q, s = quantize_parts(t, (half, half))
        else:
            q, s = quantize_blockwise(t)
        del t
        yield name, q
        yield scale_name(name), s

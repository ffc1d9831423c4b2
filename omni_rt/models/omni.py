"""The whole model: thinker (+ audio tower), and for speech output the talker (+ code predictor) and Code2Wav.

``load_model`` builds the modules on the meta device and assigns streamed checkpoint weights, so the model is
never materialised twice.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
from torch import nn

from ..config import OmniConfig
from ..errors import CheckpointError
from ..loader import assign_parameters, iter_weights
from ..quant import fp8_supported
from .thinker import Thinker


class OmniModel(nn.Module):
    """``fp8``: thinker and talker decoder projections hold block-FP8 weights (codes + fp32 scale grids)."""

    def __init__(self, cfg: OmniConfig, with_talker: bool = True, fp8: bool = False):
        super().__init__()
        self.cfg = cfg
        self.fp8 = fp8
        self.thinker = Thinker(cfg.thinker, fp8=fp8)
        self.talker = None
        self.code2wav = None
        if with_talker and cfg.has_talker:
            from .code2wav import Code2Wav
            from .talker import Talker

            self.talker = Talker(cfg.talker, cfg.thinker.text.hidden_size, fp8=fp8)
            self.code2wav = Code2Wav(cfg.code2wav)

    @property
    def has_talker(self) -> bool:
        return self.talker is not None

    def weight_memory(self) -> dict[str, int]:
        """Bytes of parameters and buffers per component (their actual dtypes), and ``total``.

        Components: thinker (text decoder + embeddings + lm_head), audio_tower, vision, talker (decoder, codec
        embedding/head, projections), code_predictor, code2wav; absent ones are left out.
        """
        parts = {"thinker": self.thinker, "audio_tower": self.thinker.audio_tower}
        if getattr(self.thinker, "visual", None) is not None:
            parts["vision"] = self.thinker.visual
        if self.talker is not None:
            parts.update(talker=self.talker, code_predictor=self.talker.code_predictor, code2wav=self.code2wav)
        sizes = {name: _tensor_bytes(m) for name, m in parts.items()}
        sizes["thinker"] -= sizes["audio_tower"] + sizes.get("vision", 0)
        if self.talker is not None:
            sizes["talker"] -= sizes["code_predictor"]
        sizes["total"] = sum(sizes.values())
        return sizes


def _tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def build_meta_model(cfg: OmniConfig, dtype: torch.dtype, with_talker: bool = True, fp8: bool = False) -> OmniModel:
    """The model on the meta device with the parameter dtypes a load gives: ``dtype`` everywhere, except
    float8_e4m3fn codes and fp32 scale grids for the FP8 projections when ``fp8`` — for memory planning."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = OmniModel(cfg, with_talker=with_talker, fp8=fp8)
        for name, p in model.named_parameters():
            if name.endswith("_scale_inv"):  # scales stay fp32 whatever the compute dtype
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = nn.Parameter(p.float(), requires_grad=False)
        # what a load does once the weights are in (loader.assign_parameters): non-persistent buffers, and
        # post-load weight transforms such as the talker's shared expert folded into its experts
        meta = torch.device("meta")
        for sub in model.modules():
            hook = getattr(sub, "materialize_buffers", None)
            if callable(hook):
                hook(meta)
    finally:
        torch.set_default_dtype(previous)
    return model


def keeps_fp8(cfg: OmniConfig, device: str | torch.device, quantize: bool) -> bool:
    """Whether a load keeps FP8 weights FP8 on ``device``: an FP8 checkpoint or load-time quantization, on a
    device with hardware FP8 conversion (decided here, at load, never at import)."""
    return (quantize or cfg.quantization is not None) and fp8_supported(device)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               with_talker: bool = True, cfg: OmniConfig | None = None,
               progress: Callable[[str], None] | None = None, quantization: str | None = None,
               keep_fp8: bool | None = None, fp8_activations_from: int | None = None) -> OmniModel:
    """Load a HF-layout Qwen3-Omni checkpoint directory into an ``OmniModel`` on ``device`` in ``dtype``.

    quantization: None (weights as stored; an FP8 checkpoint is recognised from its config) or "fp8"
    (quantize a bf16/fp32 checkpoint's eligible weights to block FP8 while streaming it in).
    keep_fp8: keep FP8 weights FP8 in memory (default: when the device has FP8 hardware, ``keeps_fp8``);
    otherwise they are dequantized to ``dtype`` at load.
    fp8_activations_from: with FP8 weights kept, dense projections quantize their activations too (w8a8, per
    token and 128 columns) for inputs of at least this many tokens (prefill); None: weight-only everywhere.
    """
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
    cfg = cfg or OmniConfig.from_file(path)
    quantize = quantization == "fp8"
    if keep_fp8 is None:
        keep_fp8 = keeps_fp8(cfg, device, quantize)
    keep_fp8 = bool(keep_fp8 and (quantize or cfg.quantization is not None))
    start = time.perf_counter()
    with torch.device("meta"):
        model = OmniModel(cfg, with_talker=with_talker, fp8=keep_fp8)
    wanted = ("thinker.",) + (("talker.", "code2wav.") if model.has_talker else ())
    weights = iter_weights(path, cfg, dtype, device, include=lambda n: n.startswith(wanted), progress=progress,
                           quantize=quantize, keep_fp8=keep_fp8)
    assign_parameters(model, weights, strict=True)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"parameters never loaded: {leftover[:3]}")
    model.eval()
    if fp8_activations_from is not None:
        from .layers import FP8Linear
        from .moe import SparseMoE

        for m in model.modules():
            if isinstance(m, FP8Linear) or (isinstance(m, SparseMoE) and m.experts.gate_up_proj_scale_inv is not None):
                m.act_fp8_min_tokens = fp8_activations_from
    if progress:
        progress(f"loaded {path} in {time.perf_counter() - start:.2f} s")
    return model

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
from .thinker import Thinker


class OmniModel(nn.Module):
    def __init__(self, cfg: OmniConfig, with_talker: bool = True):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker)
        self.talker = None
        self.code2wav = None
        if with_talker and cfg.has_talker:
            from .code2wav import Code2Wav
            from .talker import Talker

            self.talker = Talker(cfg.talker, cfg.thinker.text.hidden_size)
            self.code2wav = Code2Wav(cfg.code2wav)

    @property
    def has_talker(self) -> bool:
        return self.talker is not None


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               with_talker: bool = True, cfg: OmniConfig | None = None,
               progress: Callable[[str], None] | None = None) -> OmniModel:
    """Load a HF-layout Qwen3-Omni checkpoint directory into an ``OmniModel`` on ``device`` in ``dtype``."""
    cfg = cfg or OmniConfig.from_file(path)
    start = time.perf_counter()
    with torch.device("meta"):
        model = OmniModel(cfg, with_talker=with_talker)
    wanted = ("thinker.",) + (("talker.", "code2wav.") if model.has_talker else ())
    weights = iter_weights(path, cfg, dtype, device, include=lambda n: n.startswith(wanted), progress=progress)
    assign_parameters(model, weights, strict=True)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"parameters never loaded: {leftover[:3]}")
    model.eval()
    if progress:
        progress(f"loaded {path} in {time.perf_counter() - start:.2f} s")
    return model

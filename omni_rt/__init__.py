"""omni_rt: an inference runtime for the Qwen3-Omni model family.

Public names: Runtime, Prompt, SamplingParams, audio, vision, testing, CheckpointError, ConfigError.
Heavy submodules load lazily so ``import omni_rt`` stays cheap and never touches a device.
"""
from __future__ import annotations

import importlib

from .errors import CancelledRequest, CheckpointError, ConfigError, DeviceFault

__version__ = "0.1.0"

_LAZY = {
    "Runtime": ("omni_rt.runtime", "Runtime"),
    "Prompt": ("omni_rt.request", "Prompt"),
    "SamplingParams": ("omni_rt.request", "SamplingParams"),
    "GenerationOutput": ("omni_rt.request", "GenerationOutput"),
    "StreamChunk": ("omni_rt.request", "StreamChunk"),
    "OmniConfig": ("omni_rt.config", "OmniConfig"),
    "audio": ("omni_rt.audio", None),
    "vision": ("omni_rt.vision", None),
    "testing": ("omni_rt.testing", None),
}

__all__ = ["CancelledRequest", "CheckpointError", "ConfigError", "DeviceFault", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'omni_rt' has no attribute {name!r}")

"""Helpers for comparing against transformers (test-only: transformers is imported by the caller)."""
from __future__ import annotations

_HF_PREFIXES = (
    ("thinker.model.language_model.", "thinker.model."),
    ("thinker.model.audio_tower.", "thinker.audio_tower."),
    ("thinker.model.visual.", "thinker.visual."),
)


def hf_to_omni_name(name: str) -> str:
    """transformers' in-memory parameter name -> omni_rt's (which equals the on-disk name, experts stacked)."""
    for hf, ours in _HF_PREFIXES:
        if name.startswith(hf):
            return ours + name[len(hf):]
    return name

"""Synthetic checkpoints for tests and benchmarks (no weights can be downloaded here)."""
from .checkpoint import build_synthetic_model, make_checkpoint, random_state_dict
from .configs import NAMED, full_config, resolve_config, small_config, tiny_config

__all__ = ["build_synthetic_model", "make_checkpoint", "random_state_dict", "NAMED", "full_config", "resolve_config", "small_config",
           "tiny_config"]

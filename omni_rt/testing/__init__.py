"""Synthetic checkpoints for tests and benchmarks (no weights can be downloaded here)."""
from .checkpoint import make_checkpoint, random_state_dict
from .configs import NAMED, full_config, resolve_config, small_config, tiny_config

__all__ = ["make_checkpoint", "random_state_dict", "NAMED", "full_config", "resolve_config", "small_config",
           "tiny_config"]

"""Checkpoint directory → weights: streaming safetensors, on-disk name map, expert stacking, dtype cast.

The model is never materialised twice: modules are built on the meta device, each tensor is read from its
(memory-mapped) file, cast and moved to the target device once, and assigned as the module's parameter.
Per-expert tensors are copied straight into one preallocated ``[E, ...]`` stack per layer.
Missing, unexpected or mis-shaped tensors raise ``CheckpointError`` naming the tensor and the file.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .config import OmniConfig
from .errors import CheckpointError
from .layout import checkpoint_layout, model_layout, parse_expert_name

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file path, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {}
        for name, file in weight_map.items():
            full = os.path.join(path, file)
            if not os.path.isfile(full):
                raise CheckpointError(f"{index} maps tensor '{name}' to missing file {file}")
            files[name] = full
        return files
    singles = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not singles:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {path}")
    files = {}
    for file in singles:
        full = os.path.join(path, file)
        with safe_open(full, framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise CheckpointError(f"tensor '{name}' appears in both {files[name]} and {full}")
                files[name] = full
    return files


def _group_by_file(files: dict[str, str]) -> dict[str, list[str]]:
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    return by_file


def iter_weights(path: str | os.PathLike, cfg: OmniConfig, dtype: torch.dtype, device: torch.device | str,
                 include: Callable[[str], bool] = lambda name: True,
                 progress: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (model parameter name, tensor on ``device`` in ``dtype``), experts stacked.

    Checks the whole file set against ``checkpoint_layout(cfg)`` first, so a bad checkpoint fails before
    any weight is read. ``include`` filters by model parameter name (e.g. skip the talker).
    """
    from safetensors import safe_open

    files = checkpoint_files(path)
    expected = checkpoint_layout(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s), e.g. '{missing[0]}'"
                              + (f", '{missing[1]}'" if len(missing) > 1 else ""))
    unexpected = [n for n in files if n not in expected]
    if unexpected:
        n = unexpected[0]
        raise CheckpointError(f"unexpected tensor '{n}' in {os.path.basename(files[n])} "
                              f"({len(unexpected)} unexpected in all) for this config")
    stacked = model_layout(cfg)
    stacks: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    device = torch.device(device)
    start, nbytes = time.perf_counter(), 0
    by_file = _group_by_file(files)
    for i, (file, names) in enumerate(sorted(by_file.items())):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"tensor '{name}' in {os.path.basename(file)} has shape {shape}, "
                                          f"expected {expected[name]}")
                parsed = parse_expert_name(name)
                target = name if parsed is None else (
                    f"{parsed[0]}.down_proj" if parsed[2] == "down_proj" else f"{parsed[0]}.gate_up_proj")
                if not include(target):
                    continue
                t = f.get_tensor(name)
                nbytes += t.numel() * t.element_size()
                if parsed is None:
                    yield name, t.to(device=device, dtype=dtype)
                    continue
                prefix, e, proj = parsed
                stack = stacks.get(target)
                if stack is None:
                    stack = stacks[target] = torch.empty(stacked[target], dtype=dtype, device=device)
                    filled[target] = 0
                if proj == "gate_proj":
                    stack[e, : shape[0]].copy_(t)
                elif proj == "up_proj":
                    stack[e, shape[0]:].copy_(t)
                else:
                    stack[e].copy_(t)
                filled[target] += 1
                per_stack = stacked[target][0] * (2 if proj != "down_proj" else 1)
                if filled[target] == per_stack:
                    yield target, stacks.pop(target)
        if progress:
            dt = time.perf_counter() - start
            progress(f"read {i + 1}/{len(by_file)} files, {nbytes / 1e9:.2f} GB, {nbytes / 1e9 / max(dt, 1e-9):.2f} GB/s")
    if stacks:
        raise CheckpointError(f"incomplete expert stacks after reading {path}: {sorted(stacks)[:3]}")


def assign_parameters(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], prefix: str = "",
                      strict: bool = True) -> None:
    """Assign tensors as ``module``'s parameters (built on the meta device) without copying them again.

    ``weights`` names are full model names; only those under ``prefix`` are taken. With ``strict``, every
    parameter of ``module`` must be assigned and every weight under ``prefix`` must match a parameter.
    Afterwards each submodule's ``materialize_buffers(device)`` hook (if any) builds its non-persistent
    buffers (rotary tables, code offsets), which are not stored in checkpoints.
    """
    params = dict(module.named_parameters())
    seen = set()
    device = None
    for name, tensor in weights:
        if prefix and not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        if local not in params:
            if strict:
                raise CheckpointError(f"weight '{name}' has no parameter in {type(module).__name__}")
            continue
        expected = tuple(params[local].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"weight '{name}' has shape {tuple(tensor.shape)}, parameter expects {expected}")
        owner_name, _, leaf = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        seen.add(local)
        device = tensor.device
    if strict:
        missing = [n for n in params if n not in seen]
        if missing:
            raise CheckpointError(f"no weight for parameter(s) {[prefix + n for n in missing[:3]]} "
                                  f"({len(missing)} missing)")
    if device is not None:
        for sub in module.modules():
            hook = getattr(sub, "materialize_buffers", None)
            if callable(hook):
                hook(device)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    cfg: OmniConfig | None = None) -> tuple[OmniConfig, dict[str, torch.Tensor]]:
    """(config, {model parameter name: tensor}) for a checkpoint directory — for tests and tools."""
    cfg = cfg or OmniConfig.from_file(path)
    return cfg, dict(iter_weights(path, cfg, dtype, device))

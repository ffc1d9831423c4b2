"""Checkpoint directory → weights: streaming safetensors, on-disk name map, expert stacking, dtype cast.

The model is never materialised twice: modules are built on the meta device, each tensor is read from its
(memory-mapped) file, cast and moved to the target device once, and assigned as the module's parameter.
Per-expert tensors are copied straight into one preallocated ``[E, ...]`` stack per layer.
Missing, unexpected or mis-shaped tensors raise ``CheckpointError`` naming the tensor and the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .config import OmniConfig
from .errors import CheckpointError
from .layout import checkpoint_layout, fused_parts, fused_target, is_scale, model_layout, parse_expert_name
from .quant import (BLOCK, FP8_DTYPE, SCALE_SUFFIX, dequantize_blockwise, is_fp8_eligible, quantize_blockwise,
                    scale_name, scale_shape)

INDEX_FILE = "model.safetensors.index.json"

# On-disk dtypes a weight may have: floats (cast to the runtime dtype) and block-FP8 codes (with their scales).
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3"}


@contextlib.contextmanager
def _open_shard(file: str):
    """safe_open a shard, turning a corrupt or truncated file into a CheckpointError that names it."""
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (bad header, truncated data), OSError
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    with handle as f:
        yield f


def _read_tensor(f, name: str, file: str, fp8_ok: bool = False) -> torch.Tensor:
    """One tensor of an open shard; a non-float dtype or an unreadable tensor is a CheckpointError naming both."""
    try:
        kind = f.get_slice(name).get_dtype()
    except Exception as e:  # noqa: BLE001 - the header names it but the slice cannot be read
        raise CheckpointError(f"tensor '{name}' in {file} cannot be read: {type(e).__name__}: {e}") from None
    allowed = _FLOAT_DTYPES | (_FP8_DTYPES if fp8_ok else set())
    if kind not in allowed:
        raise CheckpointError(f"tensor '{name}' in {file} has dtype {kind}; weights must be floating point "
                              f"({', '.join(sorted(allowed))})")
    try:
        return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"tensor '{name}' in {file} cannot be read: {type(e).__name__}: {e}") from None


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """tensor name -> safetensors file path, from the index (sharded) or the single file's header."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
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
        with _open_shard(full) as f:
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


def _read_scales(by_file: dict[str, list[str]], weights: dict[str, tuple[int, ...]],
                 block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Every ``*.weight_scale_inv`` in the files (tiny: 1/16384 of the weights), checked against its weight.

    Read up front so a weight and its scale may sit in different shards.
    """
    scales = {}
    for file, names in sorted(by_file.items()):
        wanted = [n for n in names if is_scale(n)]
        if not wanted:
            continue
        with _open_shard(file) as f:
            for name in wanted:
                weight = name[: -len(SCALE_SUFFIX)]
                shape = tuple(f.get_slice(name).get_shape())
                if weight not in weights or len(weights[weight]) != 2:
                    raise CheckpointError(f"unexpected tensor '{name}' in {os.path.basename(file)}: no 2-D "
                                          f"weight '{weight}' in this config")
                want = scale_shape(weights[weight], block)
                if shape != want:
                    raise CheckpointError(f"tensor '{name}' in {os.path.basename(file)} has shape {shape}, "
                                          f"expected {want} (ceil(rows/{block[0]}), ceil(cols/{block[1]})) for "
                                          f"'{weight}' of shape {weights[weight]}")
                t = _read_tensor(f, name, file)
                if not t.dtype.is_floating_point or t.dtype == FP8_DTYPE:
                    raise CheckpointError(f"tensor '{name}' in {os.path.basename(file)} must be a float32/"
                                          f"bfloat16/float16 scale grid, got {t.dtype}")
                scales[name] = t.float()
    return scales


def iter_weights(path: str | os.PathLike, cfg: OmniConfig, dtype: torch.dtype, device: torch.device | str,
                 include: Callable[[str], bool] = lambda name: True,
                 progress: Callable[[str], None] | None = None, *, quantize: bool = False,
                 keep_fp8: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (model parameter name, tensor on ``device`` in ``dtype``), experts stacked.

    Checks the whole file set against ``checkpoint_layout(cfg)`` first, so a bad checkpoint fails before
    any weight is read. ``include`` filters by model parameter name (e.g. skip the talker).

    Block-FP8 (``omni_rt.quant``): weights stored in FP8 (with their ``*.weight_scale_inv``) are dequantized to
    ``dtype`` — unless ``keep_fp8``, which yields FP8-eligible weights as float8_e4m3fn codes plus an fp32
    ``<param>_scale_inv`` grid (experts: stacked codes and stacked grids, gate grid rows then up grid rows).
    ``quantize`` quantizes unquantized eligible weights as they are read (each on-disk matrix on its own
    128×128 grid, before stacking), then keeps or dequantizes them likewise.

    A corrupt or truncated shard, or a weight stored as integers/bools, is a ``CheckpointError`` naming the file
    (and the tensor). A text-only config (``enable_audio_output: false``) over a checkpoint that still ships
    talker/code2wav weights loads the thinker and ignores those tensors with one warning, as transformers does.
    """
    files = checkpoint_files(path)
    expected = checkpoint_layout(cfg)
    if cfg.talker is None:
        extra = [n for n in files if n.startswith(("talker.", "code2wav.")) and n not in expected]
        if extra:
            warnings.warn(f"{path}: the config makes this a text-only model (enable_audio_output is false or "
                          f"there is no talker config), so its {len(extra)} talker/code2wav tensors are ignored",
                          UserWarning, stacklevel=2)
            for n in extra:
                del files[n]
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s), e.g. '{missing[0]}'"
                              + (f", '{missing[1]}'" if len(missing) > 1 else ""))
    # Scales of weights omni_rt does not keep in FP8 are accepted too (they are dequantized at load).
    unexpected = [n for n in files if n not in expected and not (is_scale(n) and cfg.quantization is not None)]
    if unexpected:
        n = unexpected[0]
        raise CheckpointError(f"unexpected tensor '{n}' in {os.path.basename(files[n])} "
                              f"({len(unexpected)} unexpected in all) for this config")
    block = cfg.quantization.weight_block_size if cfg.quantization is not None else BLOCK
    by_file = _group_by_file(files)
    scales = _read_scales(by_file, expected, block) if cfg.quantization is not None else {}
    stacked = model_layout(cfg, fp8=keep_fp8)
    stacks: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    device = torch.device(device)
    start, nbytes = time.perf_counter(), 0

    def prepare(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On-disk tensor -> (tensor in dtype, None) or (FP8 codes, fp32 scale grid) on device."""
        scale = scales.get(scale_name(name))
        if t.dtype == FP8_DTYPE and scale is None:
            raise CheckpointError(f"tensor '{name}' is {t.dtype} but its scale '{scale_name(name)}' is missing")
        if scale is not None and t.dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor '{name}' has a scale '{scale_name(name)}' but is {t.dtype}, "
                                  f"expected {FP8_DTYPE}")
        eligible = is_fp8_eligible(name)
        if scale is None and eligible and (quantize or keep_fp8):
            t, scale = quantize_blockwise(t.to(device), block)
        if scale is None:
            return t.to(device=device, dtype=dtype), None
        t, scale = t.to(device), scale.to(device)
        if keep_fp8 and eligible:
            return t, scale
        return dequantize_blockwise(t, scale, dtype, block), None

    for i, (file, names) in enumerate(sorted(by_file.items())):
        with _open_shard(file) as f:
            for name in names:
                if is_scale(name):
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"tensor '{name}' in {os.path.basename(file)} has shape {shape}, "
                                          f"expected {expected[name]}")
                parsed = parse_expert_name(name)
                target = name if parsed is None else (
                    f"{parsed[0]}.down_proj" if parsed[2] == "down_proj" else f"{parsed[0]}.gate_up_proj")
                if not include(target):
                    continue
                t = _read_tensor(f, name, file, fp8_ok=cfg.quantization is not None)
                nbytes += t.numel() * t.element_size()
                t, scale = prepare(name, t)
                if parsed is None:
                    yield name, t
                    if scale is not None:
                        yield scale_name(name), scale
                    continue
                prefix, e, proj = parsed
                stack = stacks.get(target)
                if stack is None:
                    stack = stacks[target] = torch.empty(stacked[target], dtype=t.dtype, device=device)
                    filled[target] = 0
                    if scale is not None:
                        stacks[scale_name(target)] = torch.empty(stacked[scale_name(target)],
                                                                 dtype=torch.float32, device=device)
                rows = slice(None) if proj == "down_proj" else (
                    slice(0, shape[0]) if proj == "gate_proj" else slice(shape[0], None))
                stack[e, rows].copy_(t)
                if scale is not None:
                    g = scale.shape[0]
                    srows = slice(None) if proj == "down_proj" else (
                        slice(0, g) if proj == "gate_proj" else slice(g, None))
                    stacks[scale_name(target)][e, srows].copy_(scale)
                filled[target] += 1
                per_stack = stacked[target][0] * (2 if proj != "down_proj" else 1)
                if filled[target] == per_stack:
                    yield target, stacks.pop(target)
                    if scale_name(target) in stacks:
                        yield scale_name(target), stacks.pop(scale_name(target))
        if progress:
            dt = time.perf_counter() - start
            progress(f"read {i + 1}/{len(by_file)} files, {nbytes / 1e9:.2f} GB, {nbytes / 1e9 / max(dt, 1e-9):.2f} GB/s")
    if stacks:
        raise CheckpointError(f"incomplete expert stacks after reading {path}: {sorted(stacks)[:3]}")


class _FusedBuffer:
    """One fused parameter (q/k/v or gate/up) being filled part by part as the parts stream in."""

    def __init__(self, target: str, rows: list[int]):
        self.target, self.rows = target, rows
        self.tensor: torch.Tensor | None = None
        self.filled: set[int] = set()

    def put(self, name: str, index: int, t: torch.Tensor, shape: tuple[int, ...]) -> bool:
        """Copy part ``index`` (on-disk ``name``) into its rows; True once every part is in."""
        want = (self.rows[index], *shape[1:])
        if tuple(t.shape) != want:
            raise CheckpointError(f"weight '{name}' has shape {tuple(t.shape)}, expected {want} (part {index} of "
                                  f"the fused '{self.target}' {shape})")
        if index in self.filled:
            raise CheckpointError(f"weight '{name}' given twice")
        if self.tensor is None:
            self.tensor = torch.empty(shape, dtype=t.dtype, device=t.device)
        elif t.dtype != self.tensor.dtype or t.device != self.tensor.device:
            raise CheckpointError(f"weight '{name}' is {t.dtype} on {t.device}, but the other parts of "
                                  f"'{self.target}' are {self.tensor.dtype} on {self.tensor.device}")
        start = sum(self.rows[:index])
        self.tensor[start:start + self.rows[index]].copy_(t)
        self.filled.add(index)
        return len(self.filled) == len(self.rows)


def _part_rows(owner: nn.Module, leaf: str, shape: tuple[int, ...], count: int) -> list[int] | None:
    """Rows of each part of the fused parameter ``leaf`` of ``owner``: its ``parts`` widths, or their scale-grid
    rows (each part on its own 128-row grid) for ``weight_scale_inv``."""
    parts = getattr(owner, "parts", None)
    if parts is None or len(parts) != count:
        return None
    if leaf.endswith(SCALE_SUFFIX):
        return [-(-p // BLOCK[0]) for p in parts]
    return list(parts)


def assign_parameters(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], prefix: str = "",
                      strict: bool = True) -> None:
    """Assign tensors as ``module``'s parameters (built on the meta device) without copying them again.

    ``weights`` names are full model names (transformers' in-memory names: ``iter_weights``,
    ``testing.random_state_dict``); only those under ``prefix`` are taken. Parts of a fused projection
    (q/k/v_proj → ``qkv_proj``, gate/up_proj → ``gate_up_proj``; ``layout.fused_target``) are copied into the
    fused parameter's rows as they arrive (one copy, like the expert stacks); a part of the wrong shape or
    given twice is a ``CheckpointError`` naming it. With ``strict``, every parameter of ``module`` must be
    assigned (a fused one needs all its parts: the missing ones are named) and every weight under ``prefix``
    must match a parameter. Afterwards each submodule's ``materialize_buffers(device)`` hook (if any) builds
    its non-persistent buffers (rotary tables, code offsets), which are not stored in checkpoints.
    """
    params = dict(module.named_parameters())
    seen = set()
    device = None
    pending: dict[str, _FusedBuffer] = {}

    def assign(local: str, tensor: torch.Tensor) -> None:
        owner_name, _, leaf = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        seen.add(local)

    for name, tensor in weights:
        if prefix and not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        fused = fused_target(local) if local not in params else None
        target = fused[0] if fused is not None and fused[0] in params else None
        if local not in params and target is None:
            if strict:
                raise CheckpointError(f"weight '{name}' has no parameter in {type(module).__name__}")
            continue
        param = params[target or local]
        if (param.dtype == torch.float8_e4m3fn) != (tensor.dtype == torch.float8_e4m3fn):
            raise CheckpointError(f"weight '{name}' is {tensor.dtype}, parameter expects {param.dtype}")
        device = tensor.device
        if target is not None:
            if target in seen:
                raise CheckpointError(f"weight '{name}' given twice (its fused '{prefix + target}' is complete)")
            buf = pending.get(target)
            if buf is None:
                owner_name, _, leaf = target.rpartition(".")
                owner = module.get_submodule(owner_name)
                rows = _part_rows(owner, leaf, tuple(param.shape), fused[2])
                if rows is None or sum(rows) != param.shape[0]:
                    raise CheckpointError(f"weight '{name}': parameter '{prefix + target}' is not a fused "
                                          f"projection of {fused[2]} parts")
                buf = pending[target] = _FusedBuffer(prefix + target, rows)
            if buf.put(name, fused[1], tensor, tuple(param.shape)):
                assign(target, pending.pop(target).tensor)
            continue
        expected = tuple(param.shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"weight '{name}' has shape {tuple(tensor.shape)}, parameter expects {expected}")
        assign(local, tensor)
    if strict:
        if pending:
            target, buf = next(iter(pending.items()))
            absent = [prefix + n for i, n in enumerate(fused_parts(target)) if i not in buf.filled]
            raise CheckpointError(f"no weight for {absent} (part of the fused '{buf.target}'; {len(pending)} fused "
                                  f"parameter(s) incomplete)")
        missing = [n for n in params if n not in seen]
        if missing:
            shown = []
            for n in missing[:3]:
                parts = fused_parts(n)
                shown.append(f"{prefix + n} (from {', '.join(prefix + p for p in parts)})" if parts else prefix + n)
            raise CheckpointError(f"no weight for parameter(s) {shown} ({len(missing)} missing)")
    if device is not None:
        for sub in module.modules():
            hook = getattr(sub, "materialize_buffers", None)
            if callable(hook):
                hook(device)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    cfg: OmniConfig | None = None, **fp8) -> tuple[OmniConfig, dict[str, torch.Tensor]]:
    """(config, {model parameter name: tensor}) for a checkpoint directory — for tests and tools.

    ``fp8``: ``quantize`` / ``keep_fp8`` as ``iter_weights``.
    """
    cfg = cfg or OmniConfig.from_file(path)
    return cfg, dict(iter_weights(path, cfg, dtype, device, **fp8))

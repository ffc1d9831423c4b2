"""Arrows point one way: runtime → engine → models → kernels, with config/loader/sampling/... feeding them, and
nothing on the runtime path (runtime, engine, models, kernels) importing omni_rt.testing. Every import of every
module (function-level imports included) is read with ast and checked."""
from __future__ import annotations

import ast
import pathlib

import omni_rt

ROOT = pathlib.Path(omni_rt.__file__).resolve().parent

# layer of a module → layers it must never import
FORBIDDEN = {
    "runtime": {"testing"},
    "engine": {"runtime", "testing"},
    "models": {"engine", "runtime", "testing"},
    "kernels": {"models", "engine", "runtime", "testing"},
    "feeder": {"engine", "runtime", "testing"},   # config, loader, sampling, request, errors, audio, ...
    "testing": {"runtime"},                       # synthetic checkpoints build models, never a runtime
}
FEEDERS = {"config", "loader", "sampling", "request", "errors", "audio", "tokenizer", "layout", "profiling", "_ext", "quant",
           "vision"}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "omni_rt" or len(parts) == 1:
        return None
    head = parts[1]
    if head in ("runtime", "engine", "models", "kernels", "testing"):
        return head
    return "feeder" if head in FEEDERS else None   # cli, bench, serve, __main__: entry points, free to import


def imports(module: str, source: str) -> set[str]:
    """Absolute module names imported anywhere in ``source`` (module ``module``)."""
    package = module.split(".")
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from . import x` imports submodule x
    return out


def violations(module: str, source: str) -> list[str]:
    mine = layer(module)
    if mine is None:
        return []
    bad = []
    for target in sorted(imports(module, source)):
        theirs = layer(target)
        if theirs in FORBIDDEN[mine] and theirs != mine:
            bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return bad


def modules():
    import omni_rt.kernels

    kernels = pathlib.Path(omni_rt.kernels.__file__).resolve().parent   # a symlinked folder in a checkout
    trees = [(ROOT, ["omni_rt"]), (kernels, ["omni_rt", "kernels"])]
    for root, prefix in trees:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if root == ROOT and rel.parts[0] == "kernels":
                continue
            yield ".".join(prefix + list(rel.parts)), path.read_text()


def test_no_wrong_way_arrows():
    checked = 0
    bad = []
    for module, source in modules():
        bad += violations(module, source)  # a package's __init__ keeps its name: relative imports resolve alike
        checked += 1
    assert checked > 30
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_planted_wrong_way_arrow():
    assert violations("omni_rt.models.fake", "from ..engine.scheduler import Scheduler\n")
    assert violations("omni_rt.kernels.fake", "def f():\n    from omni_rt.models import talker\n")
    assert violations("omni_rt.engine.fake", "import omni_rt.testing.checkpoint\n")
    assert violations("omni_rt.sampling", "from .engine import engine\n")
    assert not violations("omni_rt.engine.fake", "from ..models.talker import TalkerTextFeed\n")
    assert not violations("omni_rt.models.fake", "from ..sampling import sample\n")

"""Ahead-of-time compile check: every shipped launch configuration of every kernel, for sm_90 and sm_80.

Discovers each module of the ``omni_rt.kernels`` package (``configs`` and ``_private`` helper modules
aside), collects its ``COMPILE_SPECS`` (``KernelSpec`` list) and compiles each spec with the real Triton
compiler for a GPUTarget, which needs no GPU. Asserts, per (module, spec, arch):

- it compiles (Triton front end, LLVM, and ptxas to a cubin);
- static shared memory fits the arch: 232448 bytes (227 KB) per block on sm_90, 166912 bytes (163 KB) on sm_80;
- no register spills: ptxas ``-v`` on the PTX reports 0 bytes of spill stores and spill loads.

A kernel module without ``COMPILE_SPECS`` (or with an empty list) fails.

Why a subprocess: the suite runs with TRITON_INTERPRET=1 (tests/conftest.py), under which ``@triton.jit``
returns an ``InterpretedFunction``; ``ASTSource`` needs a ``JITFunction``, and re-wrapping the raw Python
function is not enough, because the ``@triton.jit`` helpers a kernel calls are interpreted functions in
its module globals too. So the compiles run in a fresh interpreter without TRITON_INTERPRET (this file
run as a script), on a process pool, and write their results as JSON; the tests only read them. This works
the same under triton 3.9 and 3.6 (``make compile-check-36``).

API notes for 3.6 vs 3.9: both take ``ASTSource(fn, signature={name: type}, constexprs={name: value})``
with names as keys and match signature entries to arguments by name; constexpr arguments may be absent
from the signature or listed as ``"constexpr"``. We pass the canonical form the runtime JIT builds (every
argument in order, constexprs typed ``"constexpr"``), so specs may give either.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

KERNEL_PACKAGE = "omni_rt.kernels"
SKIP_MODULES = {"configs"}
# name -> (compute capability, max shared memory per block in bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin)
ARCHS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}
MISSING = "<no COMPILE_SPECS>"
IMPORT_ERROR = "<import error>"
WORKER_TIMEOUT_S = 1800   # every spec of every module, on 2 CPU cores that may be shared


def kernel_modules() -> list[str]:
    """Fully qualified names of the kernel modules in the package, sorted."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in SKIP_MODULES or info.name.startswith("_"):
            continue
        names.append(f"{KERNEL_PACKAGE}.{info.name}")
    return sorted(names)


def module_specs(module_name: str) -> tuple[list | None, str | None]:
    """(COMPILE_SPECS or None, error text or None) for one module."""
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return None, traceback.format_exc(limit=3)
    specs = getattr(module, "COMPILE_SPECS", None)
    if not specs:
        return None, None
    return list(specs), None


def _short(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------------------
# Worker side: runs without TRITON_INTERPRET, so @triton.jit gives real JITFunctions.

def _canonical_signature(spec) -> dict:
    """Every kernel argument in order: signature types, "constexpr" for constexprs; errors name the gap."""
    arg_names = list(spec.fn.arg_names)
    unknown = [n for n in list(spec.signature) + list(spec.constexprs) if n not in arg_names]
    if unknown:
        raise ValueError(f"spec {spec.name}: names {unknown} are not arguments of {spec.fn.__name__}{arg_names}")
    signature = {}
    missing = []
    for name in arg_names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.signature and spec.signature[name] != "constexpr":
            signature[name] = spec.signature[name]
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"spec {spec.name}: kernel arguments {missing} have neither a signature type "
                         f"nor a constexpr value")
    return signature


def _ptxas_path(capability: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except Exception:
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_fd1():
    """Capture what is written to file descriptor 1 (Python prints and subprocesses alike)."""
    captured = _Captured()
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            f.seek(0)
            captured.text = f.read()


def _parse_ptxas_log(log: str) -> dict | None:
    """Spill bytes summed over every function in a `ptxas -v` log; None when the log has no spill line."""
    spills = _PTXAS_SPILL.findall(log)
    if not spills:
        return None
    regs = [int(r) for r in _PTXAS_REGS.findall(log)]
    return {"spill_stores": sum(int(s) for s, _ in spills), "spill_loads": sum(int(l) for _, l in spills),
            "registers": max(regs) if regs else None}


def _ptxas_report(ptx: str, capability: int) -> dict:
    """Run ptxas -v on the PTX for this arch; sum spill bytes over every function it reports."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(capability), "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    report = _parse_ptxas_log(log)
    if report is None:
        raise RuntimeError(f"no spill line in ptxas -v output:\n{log}")
    return report


def _compile_one(job: tuple[str, str, str]) -> tuple[str, dict]:
    module_name, spec_name, arch = job
    key = f"{module_name}|{spec_name}|{arch}"
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        specs, _ = module_specs(module_name)
        spec = next(s for s in specs if s.name == spec_name)
        capability, _ = ARCHS[arch]
        src = triton.compiler.ASTSource(fn=spec.fn, signature=_canonical_signature(spec),
                                        constexprs=dict(spec.constexprs))
        # TRITON_DUMP_PTXAS_LOG (set by the fixture) makes Triton print its own `ptxas -v` log to fd 1, so
        # the spill count is that of the cubin Triton ships, at no extra cost. A cache hit skips ptxas
        # (and the log); then ptxas runs here on the cached PTX.
        with _captured_fd1() as log:
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        result = {"shared": int(compiled.metadata.shared)}
        report = _parse_ptxas_log(log.text)
        result.update(report if report is not None else _ptxas_report(compiled.asm["ptx"], capability))
    except Exception:
        result = {"error": traceback.format_exc(limit=6)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"{key}: {result.get('error', '').splitlines()[-1:] or 'ok'} {result['seconds']} s", file=sys.stderr,
          flush=True)
    return key, result


def run_worker(out_path: str, jobs: int, only: list[str] | None = None) -> None:
    """Compile every spec of every module (or of the modules in ``only``) for every arch.

    Writes {"module|spec|arch": {"shared", "spill_stores", "spill_loads", "registers", "seconds"} or
    {"error", "seconds"}} as JSON to out_path.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the compile worker must run without TRITON_INTERPRET")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    work = []
    for module_name in kernel_modules():
        if only and _short(module_name) not in only:
            continue
        specs, _ = module_specs(module_name)
        for spec in specs or []:
            work.extend((module_name, spec.name, arch) for arch in ARCHS
                        if spec.archs is None or arch in spec.archs)
    results = {}
    if jobs <= 1 or len(work) <= 1:
        results.update(map(_compile_one, work))
    else:
        # fork: workers inherit the imported kernel modules instead of re-importing torch and triton.
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_one, job): job for job in work}
            for future in concurrent.futures.as_completed(futures):
                try:
                    key, result = future.result()
                except Exception as exc:
                    # A compile that kills its process (e.g. a compiler crash) breaks the pool: every job still
                    # pending reports it instead of the whole check dying without results.
                    key, result = "|".join(futures[future]), {"error": f"compile process failed: {exc!r}"}
                results[key] = result
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------
# Test side: collection under the interpreter only reads module and spec names.

def _cases() -> list:
    cases = []
    for module_name in kernel_modules():
        specs, error = module_specs(module_name)
        if error is not None:
            cases.append(pytest.param(module_name, IMPORT_ERROR, "-", error,
                                      id=f"{_short(module_name)}-import"))
        elif specs is None:
            cases.append(pytest.param(module_name, MISSING, "-", None,
                                      id=f"{_short(module_name)}-no_specs"))
        else:
            for spec in specs:
                for arch in ARCHS:
                    if spec.archs is not None and arch not in spec.archs:
                        continue
                    cases.append(pytest.param(module_name, spec.name, arch, None,
                                              id=f"{_short(module_name)}-{spec.name}-{arch}"))
    return cases


_CASES = _cases()


@pytest.fixture(scope="module")
def compile_results() -> dict:
    """Run the compile worker once for the whole module (in a subprocess without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The worker runs this file as a script (sys.path[0] = tests/): put the checkout under test first, so a
    # worktree's kernels are compiled rather than those of an installed copy of the package.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    # The worker must compile the kernels this test imported (a git worktree's, not an installed checkout's):
    # run as a script, its sys.path starts with tests/, so put this omni_rt's parent first.
    import omni_rt

    root = os.path.dirname(os.path.dirname(os.path.abspath(omni_rt.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    jobs = max(1, min(os.cpu_count() or 1, 8))
    with tempfile.TemporaryDirectory() as tmp:
        # A private, empty Triton cache: every kernel goes through Triton's own ptxas (whose -v log gives the
        # spills of the cubin Triton ships), so the result never depends on what an earlier run cached.
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton_cache")
        out_path = os.path.join(tmp, "compile_results.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out_path,
                               "--jobs", str(jobs)], env=env, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0 or not os.path.exists(out_path):
            pytest.fail(f"compile worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                        f"{proc.stderr[-8000:]}")
        with open(out_path) as f:
            return json.load(f)


def test_kernel_modules_discovered():
    # The package always ships at least one kernel; an empty discovery would make every check vacuous.
    assert kernel_modules(), f"no kernel modules found in {KERNEL_PACKAGE}"


def test_spec_names_unique():
    for module_name in kernel_modules():
        specs, _ = module_specs(module_name)
        names = [s.name for s in specs or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        assert not dupes, f"{module_name}: duplicate KernelSpec names {dupes}"


def test_ptxas_log_parser():
    # Spills are summed over every function in the log; a log without the line is "no report".
    log = ("ptxas info    : Function properties for k0\n"
           "    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n"
           "ptxas info    : Function properties for k1\n"
           "    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers\n")
    assert _parse_ptxas_log(log) == {"spill_stores": 12, "spill_loads": 16, "registers": 255}
    assert _parse_ptxas_log("ptxas info    : Used 40 registers\n") is None


def test_canonical_signature_forms():
    from omni_rt.kernels import KernelSpec
    from omni_rt.kernels.block_window_attention import COMPILE_SPECS

    spec = COMPILE_SPECS[0]
    canonical = _canonical_signature(spec)
    assert list(canonical) == list(spec.fn.arg_names)
    assert all(canonical[name] == "constexpr" for name in spec.constexprs)
    # Constexprs also listed in the signature as "constexpr" (the runtime JIT's form) give the same result.
    listed = dict(spec.signature, **{name: "constexpr" for name in spec.constexprs})
    assert _canonical_signature(KernelSpec(spec.name, spec.fn, listed, spec.constexprs)) == canonical
    dropped = dict(spec.constexprs)
    dropped.pop("BLOCK_M")
    with pytest.raises(ValueError, match="BLOCK_M"):
        _canonical_signature(KernelSpec(spec.name, spec.fn, spec.signature, dropped))
    with pytest.raises(ValueError, match="not arguments"):
        _canonical_signature(KernelSpec(spec.name, spec.fn, dict(spec.signature, bogus="i32"), spec.constexprs))


@pytest.mark.parametrize("module_name,spec_name,arch,import_error", _CASES)
def test_compile(module_name, spec_name, arch, import_error, compile_results):
    if spec_name == IMPORT_ERROR:
        pytest.fail(f"{module_name} failed to import:\n{import_error}")
    if spec_name == MISSING:
        pytest.fail(f"{module_name} has no COMPILE_SPECS: every kernel module must list the launch "
                    f"configurations it ships (KernelSpec in kernels/__init__.py)")
    result = compile_results.get(f"{module_name}|{spec_name}|{arch}")
    assert result is not None, f"{module_name}:{spec_name} for {arch} missing from the worker's results"
    assert "error" not in result, f"{module_name}:{spec_name} failed to compile for {arch}:\n{result['error']}"
    _, smem_limit = ARCHS[arch]
    assert result["shared"] <= smem_limit, (
        f"{module_name}:{spec_name} on {arch} needs {result['shared']} bytes of shared memory "
        f"> {smem_limit} available per block")
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, (
        f"{module_name}:{spec_name} on {arch} spills registers: {result['spill_stores']} bytes stores, "
        f"{result['spill_loads']} bytes loads ({result['registers']} registers)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile worker for tests/test_kernel_compile.py")
    parser.add_argument("--worker", metavar="OUT_JSON", required=True)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="*", help="kernel module names (e.g. fused_moe) to compile")
    args = parser.parse_args()
    run_worker(args.worker, args.jobs, args.only)

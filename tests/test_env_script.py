"""The install's environment logic (scripts/env.sh, scripts/triton36.sh): which interpreter each step of `make demo`
/ `make test` uses, and that the triton-3.6 compile check sees the same torch as the rest of the suite, in each
set-up a newcomer meets: no environment active (a project .venv), an active virtualenv, an active conda env."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env_print(**env) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "OMNI_RT_PYTHON", "OMNI_RT_VENV", "PYTHONPATH")}
    base.update(env)
    out = subprocess.run(["bash", str(ROOT / "scripts/env.sh"), "--print"], env=base, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def fake_env(tmp_path: Path, name: str) -> Path:
    """A folder shaped like an environment whose bin/python runs this interpreter. A wrapper script, not a symlink:
    a symlink to a virtualenv's python in a folder without pyvenv.cfg would start the base interpreter instead."""
    prefix = tmp_path / name
    (prefix / "bin").mkdir(parents=True)
    py = prefix / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    return prefix


def same_python_everywhere(d: dict[str, str]) -> None:
    assert d["INSTALL_PYTHON"] == d["TEST_PYTHON"] == d["TRITON36_PYTHON"] == d["PYTHON"]
    assert d["TRITON36_PYTHONPATH"].split(":")[0] == d["TRITON36_DIR"]


def test_no_environment_uses_a_project_venv(tmp_path):
    venv = tmp_path / "venv"
    d = env_print(OMNI_RT_VENV=str(venv))
    assert d["MODE"] == "project-venv"
    assert d["PYTHON"] == f"{venv}/bin/python"
    assert d["CREATE_VENV"] == "1" and d["VENV_CREATE_FROM"] == "python3"
    same_python_everywhere(d)
    # once it exists it is reused, not recreated
    fake_env(tmp_path, "venv")
    d = env_print(OMNI_RT_VENV=str(venv))
    assert d["CREATE_VENV"] == "0" and d["PYTHON"] == f"{venv}/bin/python"


def test_active_virtualenv_is_used_as_is(tmp_path):
    prefix = fake_env(tmp_path, "myvenv")
    d = env_print(VIRTUAL_ENV=str(prefix), CONDA_PREFIX=str(tmp_path / "conda"))  # a venv on top of conda wins
    assert d["MODE"] == "virtualenv" and d["PYTHON"] == f"{prefix}/bin/python" and d["CREATE_VENV"] == "0"
    same_python_everywhere(d)


def test_active_conda_env_is_used_as_is(tmp_path):
    prefix = fake_env(tmp_path, "conda")
    d = env_print(CONDA_PREFIX=str(prefix))
    assert d["MODE"] == "conda" and d["PYTHON"] == f"{prefix}/bin/python" and d["CREATE_VENV"] == "0"
    same_python_everywhere(d)


def test_explicit_python_wins(tmp_path):
    d = env_print(OMNI_RT_PYTHON=sys.executable, VIRTUAL_ENV=str(tmp_path))
    assert d["MODE"] == "explicit" and d["PYTHON"] == sys.executable


def test_ensure_refuses_a_missing_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "OMNI_RT_PYTHON")}
    env["VIRTUAL_ENV"] = str(tmp_path / "gone")
    r = subprocess.run(["bash", str(ROOT / "scripts/env.sh"), "--ensure"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "not an executable Python" in r.stderr


@pytest.mark.parametrize("mode", ["virtualenv", "conda"])
def test_triton36_step_sees_the_same_torch(tmp_path, mode):
    """scripts/triton36.sh --check with the 3.6 folder first on PYTHONPATH: triton comes from that folder, torch
    from the chosen interpreter's own site-packages (the very torch the suite imports). The folder holds a
    stand-in `triton` package (version 3.6.0) so the check runs without downloading triton."""
    import torch

    prefix = fake_env(tmp_path, "env")
    t36 = tmp_path / "t36"
    (t36 / "triton").mkdir(parents=True)
    (t36 / "triton" / "__init__.py").write_text("__version__ = '3.6.0'\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "OMNI_RT_PYTHON", "PYTHONPATH")}
    env["VIRTUAL_ENV" if mode == "virtualenv" else "CONDA_PREFIX"] = str(prefix)
    env["OMNI_RT_TRITON36_DIR"] = str(t36)
    r = subprocess.run(["bash", str(ROOT / "scripts/triton36.sh"), "--check"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"from {torch.__file__}" in r.stdout and "triton 3.6.0" in r.stdout
    # and a wrong version in the folder is caught
    (t36 / "triton" / "__init__.py").write_text("__version__ = '3.9.0'\n")
    r = subprocess.run(["bash", str(ROOT / "scripts/triton36.sh"), "--check"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "want 3.6.0" in r.stderr

"""Build and install omni_rt.

The C++ extension ``omni_rt._C`` (paged-KV block manager) is built with pybind11 only: it takes plain
integers and returns plain lists/buffers, so it has no tie to torch's ABI and builds in seconds anywhere
with a C++ compiler.  Set ``OMNI_RT_SKIP_BUILD=1`` to install without it (imports of ``omni_rt._C`` then
raise an error that says how to build it).

Install for development (keeps the installed torch; never pulls a CUDA build)::

    pip install "torch==2.13.0"            # only when no torch is installed: the CPU wheel on disk
    pip install pybind11 setuptools
    pip install -e . --no-build-isolation
"""
import os

from setuptools import setup

AUDIO = ["soundfile", "scipy"]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "websockets>=12"] + AUDIO
VISION = ["pillow"]            # image files and PIL images (uint8 arrays need nothing)
VIDEO = ["pillow", "av"]       # video files and their audio tracks (PyAV)
RAY = ["ray[serve]>=2.30"]

ext_modules = []
cmdclass = {}
if os.environ.get("OMNI_RT_SKIP_BUILD", "0") not in ("1", "true", "TRUE", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules = [
        Pybind11Extension(
            "omni_rt._C",
            sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O2"],
        )
    ]
    cmdclass = {"build_ext": build_ext}

setup(
    name="omni_rt",
    version="0.1.0",
    description="Inference runtime for Qwen3-Omni: Triton kernels, paged KV cache, streaming speech out",
    python_requires=">=3.10",
    packages=[
        "omni_rt",
        "omni_rt.models",
        "omni_rt.engine",
        "omni_rt.testing",
        "omni_rt.serve",
        "omni_rt.kernels",
        "omni_rt.kernels.configs",
    ],
    # Triton kernels live in the top-level kernels/ folder but ship as omni_rt.kernels: a top-level
    # `kernels` package would clash with an existing PyPI distribution of that name.
    package_dir={"omni_rt.kernels": "kernels", "omni_rt.kernels.configs": "kernels/configs"},
    package_data={"omni_rt.kernels.configs": ["*.json"], "omni_rt": ["assets/*"]},
    # torch is deliberately NOT pinned here with a range: a loose range would pull a multi-GB CUDA build onto
    # a CPU machine.  The Makefile installs torch==2.13.0 (CPU wheel on disk) only when no torch is present.
    install_requires=["numpy", "safetensors", "tokenizers", "jinja2"],
    # Optional extras (pip install -e ".[serve]"); none of them pulls torch.  silero-vad (the Realtime server VAD) is
    # installed by scripts/install.sh with --no-deps: its own extras pin a torchaudio that would replace torch.
    extras_require={
        "audio": AUDIO,
        "serve": SERVE,
        "vision": VISION,
        "video": VIDEO,
        "ray": RAY,
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers==5.23.0", "openai>=1.40", "httpx"]
        + AUDIO + SERVE + VIDEO + RAY,
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["omni-rt=omni_rt.cli:main"]},
    zip_safe=False,
)

"""llama.cpp's own converter for the GGUF tests: `convert_hf_to_gguf.py` and its gguf-py, as shipped inside
the llama-cpp-python source distribution on PyPI (never copied into this repository). Downloaded once
into a cache outside the repository (~/.cache/llama-parity, or $LLAMA_PARITY_CACHE) with pip itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
_INNER = "vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_PARITY_CACHE", Path.home() / ".cache" / "llama-parity"))


def converter_script() -> Path:
    """Path to llama.cpp's convert_hf_to_gguf.py, fetching the sdist (pip download) the first time."""
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache_dir())], check=True)
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            inner = m.name.split("/", 1)[-1]
            if inner.startswith(_INNER) and inner[len(_INNER):].startswith(_KEEP) and (m.isfile() or m.isdir()):
                m.name = inner[len(_INNER):]
                tar.extract(m, tmp, filter="data")
    tmp.rename(root)
    return script


_DRIVER = """
import os, runpy, sys
script, jobs = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))
for job in jobs:
    src, outtype, out = job.split("|")
    sys.argv = [script, src, "--outtype", outtype, "--outfile", out]
    runpy.run_path(script, run_name="__main__")
"""


def convert_to_gguf(jobs: list[tuple[Path, str, Path]]) -> None:
    """Run llama.cpp's converter on (HF folder, outtype, output file) jobs in one child process."""
    script = converter_script()
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(script), *(f"{a}|{t}|{o}" for a, t, o in jobs)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")

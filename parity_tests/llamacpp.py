"""llama.cpp's own converter for the GGUF tests: `convert_hf_to_gguf.py` and its gguf-py, as shipped inside
the llama-cpp-python source distribution on PyPI (never copied into this repository). Downloaded once
into a cache outside the repository (~/.cache/llama-parity, or $LLAMA_PARITY_CACHE) with pip itself;
the converter's outputs are kept there too, keyed by their inputs' bytes (convert_to_gguf)."""

from __future__ import annotations

import hashlib
import os
import shutil
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


def _job_key(hf: Path, outtype: str) -> str:
    """Everything llama.cpp's converter output depends on: the HF folder's bytes, the outtype, the
    converter's version and the libraries it reads the folder with (transformers, tokenizers, torch)."""
    from importlib.metadata import version

    h = hashlib.sha256(repr((LLAMA_CPP_PYTHON, outtype, Path(hf).name, version("transformers"),
                             version("tokenizers"), version("torch"), version("safetensors"))).encode())
    for p in sorted(q for q in Path(hf).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(hf)).encode() + b"\0")
        if p.name == "README.md":  # of the model card llama.cpp reads only the YAML front matter (the body
            text = p.read_text(encoding="utf-8")  # names the session's temporary Meta folder)
            h.update(text.split("\n---\n", 1)[0].encode() if text.startswith("---\n") else b"")
            continue
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:32]


def convert_to_gguf(jobs: list[tuple[Path, str, Path]], *, cache: bool = True) -> None:
    """Run llama.cpp's converter on (HF folder, outtype, output file) jobs in one child process.

    The converter is a deterministic function of its inputs, so its outputs are kept in the cache keyed by
    _job_key: a job whose HF folder is byte-identical to an earlier run's (same converter and library
    versions) reuses that run's GGUF; any change in our conversion converts again. `cache=False` (big
    files: the benchmark's 16 GB GGUF) neither reads nor writes the cache; a failed run leaves no output."""
    store = cache_dir() / "gguf-outputs"
    todo = []
    for hf, outtype, out in jobs:
        hit = store / f"{_job_key(hf, outtype)}.gguf" if cache else None
        if hit is not None and hit.is_file():
            shutil.copyfile(hit, out)
        else:
            todo.append((hf, outtype, out, hit))
    if not todo:
        return
    script = converter_script()
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(script), *(f"{a}|{t}|{o}" for a, t, o, _ in todo)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        for _, _, out, _ in todo:
            Path(out).unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
    if not cache:
        return
    store.mkdir(parents=True, exist_ok=True)
    for _, _, out, hit in todo:
        tmp = hit.with_suffix(f".partial-{os.getpid()}")
        shutil.copyfile(out, tmp)
        tmp.rename(hit)
    _prune(store, keep=32)


def _prune(store: Path, keep: int) -> None:
    """Keep the newest `keep` cached outputs (tiny files, but every change of our converter adds some)."""
    files = sorted(store.glob("*.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)

"""GGUF benchmark: `verify --gguf` (weights, then every check) against a floor measured in the same run.

    python -m benchmarks.gguf_bench --case 8b [--layers N] [--outtype f16|q8_0]   # prints a markdown row

Builds a synthetic bf16 Meta checkpoint of the REAL shape (benchmarks/make_checkpoint.py; `--layers N`
keeps the real layer shapes and the 128k vocabulary but only N layers), converts it with llama-parity,
then to GGUF with llama.cpp's own convert_hf_to_gguf.py (the test suite's cached copy from the
llama-cpp-python sdist), and measures as child processes (peak RSS = ru_maxrss from wait4), page cache
evicted before each:

- floor: reading the Meta shard and the GGUF file once from disk (what any judge of the pair must do);
- `verify --gguf --quick`: metadata, the whole tokenizer, every weight (no model run);
- `verify --gguf`: the same plus the outputs step (the reference on Meta's, the file's and the honestly
  quantised weights, one tensor at a time) and, when llama-cpp-python is installed, llama.cpp itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run import GB, evict, machine, run_child

CASES = {"1b": "llama3.2-1b", "8b": "llama3.1-8b"}


def build(work: Path, case: str, layers: int | None, outtype: str) -> tuple[Path, Path]:
    from benchmarks.make_checkpoint import make_checkpoint
    from llama_parity import releases as variants
    from llama_parity.fixtures.tokenizers import real_llama3_tokenizer
    from llama_parity.parity_tests.llamacpp import convert_to_gguf

    tag = f"{case}-{layers}l" if layers else case
    meta = work / f"meta-{tag}" / variants.get(CASES[case]).meta_dir_name
    hf, gguf = work / f"hf-{tag}", work / f"{tag}-{outtype}.gguf"
    if not (meta / "params.json").is_file():
        make_checkpoint(CASES[case], meta, num_shards=1, tokenizer=real_llama3_tokenizer(), n_layers=layers)
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_parity.cli", "convert", "--input-dir", str(meta),
                        "--output-dir", str(hf), "--variant", CASES[case]], check=True, stdout=subprocess.DEVNULL)
    if not gguf.is_file():
        convert_to_gguf([(hf, outtype, gguf)])
    return meta, gguf


def floor(files: list[Path]) -> float:
    """Seconds to read the files once from disk, 64 MB at a time."""
    evict(files)
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 26):
                pass
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=list(CASES), default="8b")
    ap.add_argument("--layers", type=int, help="real layer shapes, only N layers (the 128k vocabulary kept)")
    ap.add_argument("--outtype", choices=["f16", "q8_0", "bf16"], default="f16")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "llama-parity-gguf-bench")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    meta, gguf = build(a.work, a.case, a.layers, a.outtype)
    files = [*meta.glob("*.pth"), gguf]
    size = sum(p.stat().st_size for p in files)
    read = floor(files)
    rows = []
    for label, flags in (("--quick", ["--quick"]), ("all", [])):
        evict(files)
        r = run_child([sys.executable, "-m", "llama_parity.cli", "verify", "--meta-dir", str(meta), "--gguf", str(gguf),
                       *flags], 0, log=a.work / f"verify{label.strip('-')}.log")
        rows.append(f"verify --gguf {label}: {r.seconds:.0f} s ({r.seconds / read:.1f}x the floor), peak RSS "
                    f"{r.peak_rss / GB:.2f} GB, {r.status}")
    load = os.getloadavg()[0]
    print(f"| {a.case}{f' ({a.layers} layers)' if a.layers else ''} {a.outtype} | {size / GB:.2f} GB read | floor "
          f"{read:.1f} s | " + " | ".join(rows) + f" | load {load:.1f} |")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()

"""GGUF benchmark: `verify --gguf` (weights, then every check) against a floor measured in the same run.

    python -m benchmarks.gguf_bench --case 8b [--layers N] [--outtype f16|q8_0|bf16]   # prints a markdown row
    python -m benchmarks.gguf_bench --case 8b --meta-dir /work/bench-8b/meta-8b/Llama3.1-8B \
        --hf-dir /work/bench-8b/hf-8b --work /work/gguf-bench       # reuse a checkpoint and its conversion

Builds a synthetic bf16 Meta checkpoint of the REAL shape (benchmarks/make_checkpoint.py; `--layers N`
keeps the real layer shapes and the 128k vocabulary but only N layers) and converts it with llama-parity,
or reuses ones given (`--meta-dir`, `--hf-dir`: read, never written); then converts to GGUF with
llama.cpp's own convert_hf_to_gguf.py (the test suite's copy from the llama-cpp-python sdist, its output
not cached: a 16 GB file) and measures as child processes, page cache evicted before each. Peak RSS is
the judge's own (ru_maxrss of the verify process itself); llama.cpp's runtime, which the full run starts in
a child and which loads the whole file itself, is reported apart (its peak as the judge's report notes it):

- llama.cpp's converter (HF folder -> GGUF), for scale;
- floor: reading the Meta shard and the GGUF file once from disk (what any judge of the pair must do);
- `verify --gguf --quick`: metadata, the whole tokenizer, every weight (no model run);
- `verify --gguf`: the same plus the outputs step (the reference on Meta's, the file's and the honestly
  quantised weights, one tensor at a time) and, when llama-cpp-python is installed, llama.cpp itself.

The GGUF it made is deleted at the end (`--keep-gguf` keeps it); the disk it needs (the GGUF's size, from
the HF folder's) is checked before converting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run import GB, evict, machine, run_child

CASES = {"1b": "llama3.2-1b", "8b": "llama3.1-8b"}


# bytes of GGUF per byte of bf16 HF weights
GGUF_RATIO = {"f16": 1.0, "bf16": 1.0, "q8_0": 34 / 64}


def build(work: Path, case: str, layers: int | None) -> tuple[Path, Path]:
    """A synthetic Meta checkpoint of the case's shape and our conversion, under `work` (kept for reruns)."""
    from benchmarks.make_checkpoint import make_checkpoint
    from llama_parity import releases as variants
    from llama_parity.fixtures.tokenizers import real_llama3_tokenizer

    tag = f"{case}-{layers}l" if layers else case
    meta = work / f"meta-{tag}" / variants.get(CASES[case]).meta_dir_name
    hf = work / f"hf-{tag}"
    if not (meta / "params.json").is_file():
        make_checkpoint(CASES[case], meta, num_shards=1, tokenizer=real_llama3_tokenizer(), n_layers=layers)
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_parity.cli", "convert", "--input-dir", str(meta),
                        "--output-dir", str(hf), "--variant", CASES[case]], check=True, stdout=subprocess.DEVNULL)
    return meta, hf


def to_gguf(hf: Path, outtype: str, gguf: Path) -> float:
    """llama.cpp's converter into `gguf` (refused up front when the disk cannot hold it); its seconds."""
    from llama_parity.parity_tests.llamacpp import convert_to_gguf

    need = int(sum(p.stat().st_size for p in hf.glob("*.safetensors")) * GGUF_RATIO[outtype]) + GB
    free = shutil.disk_usage(gguf.parent).free
    if free < need:
        raise SystemExit(f"gguf_bench: the {outtype} GGUF of {hf} needs ~{need / GB:.1f} GB in {gguf.parent}, "
                         f"{free / GB:.1f} GB free")
    t = time.perf_counter()
    convert_to_gguf([(hf, outtype, gguf)], cache=False)
    return time.perf_counter() - t


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
    ap.add_argument("--outtype", choices=list(GGUF_RATIO), default="f16")
    ap.add_argument("--meta-dir", type=Path, help="reuse this Meta checkpoint (read only; with --hf-dir)")
    ap.add_argument("--hf-dir", type=Path, help="reuse this conversion of --meta-dir (read only)")
    ap.add_argument("--keep-gguf", action="store_true", help="keep the GGUF made (deleted by default)")
    ap.add_argument("--quick-only", action="store_true",
                    help="only `verify --gguf --quick` (metadata, tokenizer, every weight): minutes less on an 8B")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "llama-parity-gguf-bench")
    a = ap.parse_args(argv)
    if (a.meta_dir is None) != (a.hf_dir is None) or (a.meta_dir and a.layers):
        ap.error("--meta-dir and --hf-dir go together (a checkpoint and its conversion), without --layers")
    if a.meta_dir and not ((a.meta_dir / "params.json").is_file() and (a.hf_dir / "config.json").is_file()):
        ap.error(f"{a.meta_dir} needs params.json and {a.hf_dir} config.json")
    a.work.mkdir(parents=True, exist_ok=True)
    meta, hf = (a.meta_dir, a.hf_dir) if a.meta_dir else build(a.work, a.case, a.layers)
    gguf = a.work / f"{a.case}{f'-{a.layers}l' if a.layers else ''}-{a.outtype}.gguf"
    made = not gguf.is_file()
    try:
        seconds = to_gguf(hf, a.outtype, gguf) if made else None
        measure(a, meta, gguf, seconds)
    finally:
        if made and not a.keep_gguf:
            gguf.unlink(missing_ok=True)


# verify in a child that records its OWN peak RSS (ru_maxrss of RUSAGE_SELF): wait4's figure for the child
# also covers its descendants, and the full run starts llama.cpp's runtime, which loads the whole file itself
_VERIFY = """
import resource, sys
from llama_parity.cli import main
rc = main(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(rc)
"""


def _runtime_peak(report: Path) -> str:
    """llama.cpp's runtime child's peak RSS, as the judge's report notes it ("" when it did not run)."""
    import json
    import re

    try:
        notes = json.loads(report.read_text()).get("notes", [])
    except (OSError, ValueError):
        return ""
    found = [m.group(1) for n in notes for m in [re.search(r"runtime loaded the file .* peak RSS ([0-9.]+ GB)", n)]
             if m]
    return f", llama.cpp's runtime child (its own load of the file) {found[0]}" if found else ""


def measure(a, meta: Path, gguf: Path, convert_seconds: float | None) -> None:
    files = [*meta.glob("*.pth"), gguf]
    size = sum(p.stat().st_size for p in files)
    read = floor(files)
    rows = [f"llama.cpp's converter: {convert_seconds:.0f} s" if convert_seconds else "GGUF reused"]
    for label, flags in (("--quick", ["--quick"]),) + ((("all", []),) if not a.quick_only else ()):
        evict(files)
        own, report = a.work / f"verify{label.strip('-')}.peak", a.work / f"verify{label.strip('-')}.json"
        own.unlink(missing_ok=True)
        report.unlink(missing_ok=True)  # an earlier run's figures must not stand for this one's
        r = run_child([sys.executable, "-c", _VERIFY, str(own), "verify", "--meta-dir", str(meta), "--gguf",
                       str(gguf), "--json", str(report), *flags], 0, log=a.work / f"verify{label.strip('-')}.log")
        judge = int(own.read_text()) if own.is_file() else r.peak_rss
        rows.append(f"verify --gguf {label}: {r.seconds:.0f} s ({r.seconds / read:.1f}x the floor), the judge's peak "
                    f"RSS {judge / GB:.2f} GB{_runtime_peak(report)}, {r.status}")
        own.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    print(f"| {a.case}{f' ({a.layers} layers)' if a.layers else ''} {a.outtype} | {size / GB:.2f} GB read | floor "
          f"{read:.1f} s | " + " | ".join(rows) + f" | load {load:.1f} |")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()

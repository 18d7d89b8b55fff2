"""Verify benchmark: streamed `verify` (every check) against a floor measured in the same run.

    python -m benchmarks.verify_bench --case 1b [--full] [--layers N]   # prints a markdown table row
    python -m benchmarks.verify_bench --case 8b --no-streaming          # the byte check and attestation only

Per case it builds a synthetic bf16 Meta checkpoint of the REAL shape (benchmarks/make_checkpoint.py;
`--layers N` keeps the real layer shapes and vocabulary but only N layers, for the 70B shape),
converts it, and measures as child processes (peak RSS = ru_maxrss from wait4):

- bare: `import torch, transformers` and the Llama modules: what any verify starts from;
- floor: reading both models' files once from disk (page cache evicted first) plus the forward
  passes' matrix multiplies at this machine's measured fp32 and bf16 matmul rates (the streams of
  llama_parity/streaming.py: FLOPs counted from their token counts and the layer shapes);
- the byte check alone (`verify --metadata-only --no-tokenizer`: every weight of both folders
  compared bit for bit and hashed, exact_bytes.py), page cache evicted first, between two cold
  `dd` reads of both folders (the disk's rate moves with other users): its rate (from verify's own
  note) as a percentage of the two reads' mean rate (issue 17: at least 80%);
- `verify --attestation` of that report against the HF folder, between two cold `dd` reads of the
  HF folder: its rate against theirs (one read, seconds per GB);
- streamed verify (`--memory streaming --no-tokenizer`, the byte check included), page cache evicted first;
- with --full, `--memory full` beside it;
- with --to-meta, `llama-parity to-meta` of the converted folder (HF -> Meta; output deleted after),
  whose peak RSS shows whether it holds one tensor or one shard (an 8B is one 16 GB shard).
"""

from __future__ import annotations

import os

# Before torch loads: the matmul rate of the floor is measured as verify runs (the CLI sets the same
# policy); with spinning OpenMP threads the measured rate varied 2x between runs on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks.run import GB, evict, machine, run_child  # noqa: E402

CASES = {"1b": "llama3.2-1b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}


def build(work: Path, case: str, layers: int | None) -> tuple[Path, Path]:
    from benchmarks.make_checkpoint import make_checkpoint
    from llama_parity import releases as variants

    tag = f"{case}-{layers}l" if layers else case
    meta = work / f"meta-{tag}" / variants.get(CASES[case]).meta_dir_name
    hf = work / f"hf-{tag}"
    if not (meta / "params.json").is_file():
        from llama_parity.fixtures.tokenizers import real_llama3_tokenizer

        make_checkpoint(CASES[case], meta, num_shards=1, tokenizer=real_llama3_tokenizer(), n_layers=layers)
    if not (hf / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llama_parity.cli", "convert", "--input-dir", str(meta),
                        "--output-dir", str(hf), "--variant", CASES[case]], check=True, stdout=subprocess.DEVNULL)
    return meta, hf


def matmul_rate(dtype: torch.dtype, n: int, d: int, f: int) -> float:
    """FLOP/s of an (n x d) @ (d x f) product: the best of three 1-second windows (a lower rate would
    raise the floor and flatter the ratio)."""
    x, w = torch.randn(n, d, dtype=dtype), torch.randn(f, d, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = 0.0
    for _ in range(3):
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            torch.nn.functional.linear(x, w)
            reps += 1
        best = max(best, 2 * n * d * f * reps / (time.perf_counter() - t0))
    return best


@dataclass(frozen=True)
class Products:
    """The matrix products a streamed verify runs (llama_parity/streams.py), per side: every stream's
    steps through each layer at once (one fp32 product per weight per layer for all of them,
    llama_parity/shared_products.py), the bf16 stream's own, the reference's greedy passes (one
    token through every layer each) and the output projection of the judged positions."""

    fp32_tokens: int = 171  # near 50, far 3 x 12, kv 50 (8 + 8 x 1 + 34), greedy prompt ~35
    bf16_tokens: int = 50
    greedy_passes: int = 7  # reference only (HF is teacher-forced on them within fp32_tokens)
    logit_rows: int = 120  # near 50 + 50 bf16, far 3 x 4, kv 50 ... (over-counted: a higher floor)

    def rates(self, d: int, f: int) -> dict:
        # a bf16 product at the faster of torch's bf16 kernels and fp32 on bf16 values (what verify
        # uses on CPUs: the same sums, rounded to bf16 after)
        bf16 = max(matmul_rate(torch.bfloat16, self.bf16_tokens, d, f), matmul_rate(torch.float32, self.bf16_tokens, d, f))
        return {(torch.float32, self.fp32_tokens): matmul_rate(torch.float32, self.fp32_tokens, d, f),
                (torch.bfloat16, self.bf16_tokens): bf16, (torch.float32, 1): matmul_rate(torch.float32, 1, d, f)}

    def seconds(self, body_params: int, head_params: int, rates: dict) -> float:
        r32, r16, r1 = (rates[torch.float32, self.fp32_tokens], rates[torch.bfloat16, self.bf16_tokens],
                        rates[torch.float32, 1])
        per_side = 2 * body_params * (self.fp32_tokens / r32 + self.bf16_tokens / r16)
        per_side += 2 * head_params * self.logit_rows / r32
        greedy = self.greedy_passes * 2 * (body_params + head_params) / r1
        return 2 * per_side + greedy


def floor_seconds(meta: Path, hf: Path, products: Products = Products()) -> tuple[float, float, float, str]:
    """(read seconds, matmul seconds, total, the rates used): both models read once cold + both sides'
    products, each priced at this machine's rate for its own shape (a one-token product reads the
    whole weight for one row: its rate is the memory's, not the matmul units')."""
    cfg = json.loads((hf / "config.json").read_text())
    d, f, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    body_params = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    read = sum(cold_read([*meta.glob("consolidated.*.pth"), *hf.glob("*.safetensors")]).values())
    rates = products.rates(d, f)
    mm = products.seconds(body_params, v * d, rates)
    said = ", ".join(f"{'bf16' if dt == torch.bfloat16 else 'fp32'} x{n} tokens {r / 1e9:.0f} GFLOP/s"
                     for (dt, n), r in rates.items())
    return read, mm, read + mm, said


def cold_read(files: list[Path]) -> dict[Path, float]:
    """Seconds to read each of `files` once with dd, their pages evicted from the page cache first."""
    evict(files)
    out = {}
    for p in files:
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=16M"], check=True, stderr=subprocess.DEVNULL)
        out[p] = time.perf_counter() - t0
    return out


def byte_check(work: Path, meta: Path, hf: Path, min_free: int) -> tuple[list, list[str], float]:
    """The byte check (`verify --metadata-only`) and the attestation re-check, each between two cold
    dd reads of the folders it reads (the disk's rate moves with other users: its rate is compared
    with the mean of the reads just before and just after), page cache evicted before each: (table
    rows, lines saying each one's rate against its reads', the mean cold read of both folders in
    seconds). The first line is the load average before."""
    metas, hfs = sorted(meta.glob("consolidated.*.pth")), sorted(hf.glob("*.safetensors"))
    both, hf_bytes = sum(p.stat().st_size for p in metas + hfs), sum(p.stat().st_size for p in hfs)
    lines, rows = [f"{os.getloadavg()[0]:.1f}"], []
    reads = [cold_read(metas + hfs)]
    evict(metas + hfs)
    log, report = work / "verify-bytes.log", work / "bytes-report.json"
    r = run_child([sys.executable, "-m", "llama_parity.cli", "verify", "--meta-dir", str(meta), "--hf-dir", str(hf),
                   "--metadata-only", "--no-tokenizer", "--json", str(report)], min_free, log=log)
    rows.append(("verify --metadata-only (byte check)", r))
    reads.append(cold_read(metas + hfs))
    evict(hfs)
    att_log = work / "attestation.log"
    r = run_child([sys.executable, "-m", "llama_parity.cli", "verify", "--attestation", str(report), "--hf-dir",
                   str(hf)], min_free, log=att_log)
    rows.append(("verify --attestation (re-check the HF folder)", r))
    reads.append(cold_read(hfs))
    both_s = [sum(rd.values()) for rd in reads[:2]]
    hf_s = [sum(rd[p] for p in hfs) for rd in reads[1:]]
    lines.append(f"cold read (dd, page cache evicted) of both folders, {both / GB:.2f} GB: before the byte check "
                 f"{both_s[0]:.1f} s, after {both_s[1]:.1f} s ({both / GB / both_s[0]:.2f} / {both / GB / both_s[1]:.2f} "
                 f"GB/s); of the HF folder, {hf_bytes / GB:.2f} GB: before the attestation {hf_s[0]:.1f} s, after "
                 f"{hf_s[1]:.1f} s ({hf_bytes / GB / hf_s[0]:.2f} / {hf_bytes / GB / hf_s[1]:.2f} GB/s)")
    for what, text, pattern, size, secs in (
            ("byte check", log.read_text(), r"weights compared bit for bit: ([\d.]+) GB read in ([\d.]+) s", both,
             both_s),
            ("attestation", att_log.read_text(), r"read ([\d.]+) GB in ([\d.]+) s", hf_bytes, hf_s)):
        m = re.search(pattern, text)
        if m:
            gb, sec = float(m[1]), float(m[2])
            disk = size / GB / (sum(secs) / 2)
            lines.append(f"{what}: {gb:.2f} GB read in {sec:.1f} s (its own timing) = {gb / sec:.2f} GB/s = "
                         f"{100 * gb / sec / disk:.0f}% of the cold reads' mean rate {disk:.2f} GB/s (issue 17: at "
                         "least 80%)")
        else:
            lines.append(f"{what}: no timing in its log (failed? see {work})")
    return rows, lines, sum(both_s) / 2


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES, default="1b")
    ap.add_argument("--layers", type=int, help="real shapes, only this many layers (70B: extrapolate)")
    ap.add_argument("--work", type=Path, default=Path("/work/bench-stream"))
    ap.add_argument("--full", action="store_true", help="also run --memory full")
    ap.add_argument("--no-streaming", action="store_true", help="only the byte check (no streamed verify)")
    ap.add_argument("--to-meta", action="store_true", help="also run HF -> Meta on the converted folder")
    ap.add_argument("--min-free", type=float, default=1.5)
    ap.add_argument("--clean", action="store_true", help="delete the checkpoints afterwards")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    meta, hf = build(a.work, a.case, a.layers)
    model_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    bare = run_child([sys.executable, "-c", "import torch, transformers; "
                      "from transformers.models.llama import modeling_llama"], 0)
    rows, bytes_lines, read_both = byte_check(a.work, meta, hf, int(a.min_free * GB))
    for mode in ([] if a.no_streaming else ["streaming"]) + (["full"] if a.full else []):
        evict([*meta.glob("*.pth"), *hf.glob("*.safetensors")])
        r = run_child([sys.executable, "-m", "llama_parity.cli", "verify", "--meta-dir", str(meta), "--hf-dir", str(hf),
                       "--memory", mode, "--no-tokenizer"], int(a.min_free * GB), log=a.work / f"verify-{mode}.log")
        rows.append((f"verify --memory {mode}", r))
    if a.to_meta:
        import shutil

        out = a.work / "to-meta-out"
        shutil.rmtree(out, ignore_errors=True)
        evict(list(hf.glob("*.safetensors")))
        r = run_child([sys.executable, "-m", "llama_parity.cli", "to-meta", "--hf-dir", str(hf), "--output-dir",
                       str(out)], int(a.min_free * GB), log=a.work / "to-meta.log")
        rows.append(("to-meta (HF -> Meta, incl. sync)", r))
        shutil.rmtree(out, ignore_errors=True)
    models = not a.no_streaming or a.full
    if models:
        read, mm, floor, rates = floor_seconds(meta, hf)
    print(f"machine: {machine()}; load average before/after: {bytes_lines.pop(0)} / {os.getloadavg()[0]:.1f}")
    print(f"case {a.case}{f' ({a.layers} layers)' if a.layers else ''}: model {model_bytes / GB:.2f} GB; "
          f"bare torch+transformers {bare.peak_rss / GB:.2f} GB RSS")
    if models:
        print(f"floor: read both models {read:.1f} s + matmuls {mm:.1f} s = {floor:.1f} s (rates: {rates})")
    print("\n".join(bytes_lines))
    for what, r in rows:
        above = r.peak_rss - bare.peak_rss
        ratio = "" if what.startswith("to-meta") else f" ({r.seconds / read_both:.2f}x the cold read of both)" \
            if "byte check" in what else f" ({model_bytes / GB / r.seconds:.2f} GB/s)" if "attestation" in what \
            else f" ({r.seconds / floor:.2f}x floor)"  # to-meta: not a verify
        print(f"| {a.case} | {what} | {r.seconds:.1f} s{ratio} | "
              f"{r.peak_rss / GB:.2f} GB | {above / GB:.2f} GB ({100 * above / model_bytes:.0f}% of model) | {r.status} |")
    if a.clean:
        import shutil

        shutil.rmtree(meta.parent)
        shutil.rmtree(hf)


if __name__ == "__main__":
    main()

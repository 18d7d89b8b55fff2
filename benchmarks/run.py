"""Conversion benchmark: our converter vs transformers' script vs `cp` + `sync` of the same bytes.

    python -m benchmarks.run --anchor /tmp/patched.py            # all cases, writes benchmarks/RESULTS.md

(`/tmp/patched.py`: transformers' script with the one-line transformers 5 fix; where to fetch it at
which version: benchmarks/README.md. Without --anchor its column is skipped.)

Per case it builds a synthetic Meta checkpoint of the REAL shape once (random bf16, real Llama 3
tokenizer; benchmarks/make_checkpoint.py, cached under --work), then runs each contender as a
child process, alternating their order between repeats. Every run starts with the input evicted
from the page cache (posix_fadvise DONTNEED on clean pages, no root needed) and the previous
output deleted and synced, and its wall time includes a `sync` after it exits, so each contender
pays for reading the input from disk and for its output reaching the disk, as `cp` + `sync` does.
Peak RSS is the child's ru_maxrss from wait4. A watchdog kills a child when the machine's
available memory falls below --min-free (the OOM killer would otherwise pick a process itself,
possibly not the benchmark's), and records that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from llama_parity.machine import available_memory

GB = 1e9
_REPO = Path(__file__).resolve().parent.parent

CASES = {
    # name: (variant, shards, transformers' --model_size, --llama_version)
    "1b": ("llama3.2-1b", 1, "1B", "3.2"),
    "1b-mp2": ("llama3.2-1b", 2, "1B", "3.2"),
    "1b-mp8": ("llama3.2-1b", 8, "1B", "3.2"),
    "8b": ("llama3.1-8b", 1, "8B", "3.1"),
}


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes
    status: str  # "ok", or how it failed


@dataclass
class CaseResult:
    case: str
    model_bytes: int
    runs: dict[str, list[Run]] = field(default_factory=dict)


def mem_available() -> int:
    avail = available_memory()
    return 1 << 62 if avail is None else avail


def evict(paths) -> None:
    """Drop the files' pages from the page cache, so every contender reads from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(cmd: list[str], min_free: int, env=None, log: Path | None = None) -> Run:
    t0 = time.perf_counter()
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    killed = threading.Event()

    def watchdog():
        while proc.returncode is None and not killed.is_set():
            if mem_available() < min_free:
                killed.set()
                proc.kill()
                return
            time.sleep(0.1)

    w = threading.Thread(target=watchdog, daemon=True)
    w.start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    killed_by_us = killed.is_set()
    killed.set()
    t_exit = time.perf_counter()
    subprocess.run(["sync"], check=True)
    t1 = time.perf_counter()
    if log:
        out.close()
    if killed_by_us:
        state = (f"killed by the benchmark's watchdog after {t_exit - t0:.0f} s: available memory fell "
                 f"below {min_free / GB:.1f} GB (peak RSS {ru.ru_maxrss * 1024 / GB:.1f} GB)")
    elif proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log else []
        state = f"exit {proc.returncode}" + (f": {tail[0][:160]}" if tail else "")
    else:
        state = "ok"
    return Run(t1 - t0, ru.ru_maxrss * 1024, state)


def bare_torch_rss() -> int:
    """Peak RSS of `python -c 'import torch'`: the floor any torch-based converter starts from."""
    r = run_child([sys.executable, "-c", "import torch; torch.empty(1)"], 0)
    return r.peak_rss


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    from importlib.metadata import version

    fs = subprocess.run(["df", "-hT", "."], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return (f"{os.cpu_count()} cores ({cpu}), {mem / 2**20:.1f} GiB RAM, no swap; "
            f"Linux {platform.release()}; disk: `{' '.join(fs.split())}`; Python {platform.python_version()}, "
            f"torch {version('torch')}, transformers {version('transformers')}")


def ensure_checkpoint(work: Path, case: str) -> Path:
    variant, shards, _, _ = CASES[case]
    folder = work / "ckpt" / f"{variant}-mp{shards}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"[bench] generating {folder} ...", flush=True)
        # In a child process: a child's ru_maxrss starts at its parent's RSS (fork/exec keeps the
        # high-water mark), so this process must stay small for the measurements to be honest.
        subprocess.run([sys.executable, "-m", "benchmarks.make_checkpoint", variant, str(folder),
                        "--shards", str(shards)], check=True, cwd=_REPO,
                       env=dict(os.environ, PYTHONPATH=str(_REPO)))
        done.write_text("ok\n")
    return folder


def commands(case: str, ckpt: Path, out: Path, anchor: Path | None) -> dict[str, list[str]]:
    variant, shards, size, version = CASES[case]
    shard_files = sorted(str(p) for p in ckpt.glob("consolidated.*.pth"))
    cmds = {
        "cp+sync": ["cp", *shard_files, str(out)],
        "ours": [sys.executable, "-m", "llama_parity.cli", "convert", "--input-dir", str(ckpt),
                 "--output-dir", str(out), "--overwrite", "--no-progress"],
        # The same without the HF tokenizer files: the weight path alone, whose speed this issue is about.
        "ours-weights": [sys.executable, "-m", "llama_parity.cli", "convert", "--input-dir", str(ckpt),
                         "--output-dir", str(out), "--overwrite", "--no-progress", "--no-tokenizer"],
    }
    if anchor:
        cmds["transformers"] = [sys.executable, str(anchor), "--input_dir", str(ckpt), "--model_size", size,
                                "--output_dir", str(out), "--llama_version", version, "--num_shards", str(shards)]
    return cmds


def bench_case(case: str, work: Path, anchor: Path | None, repeats: int, anchor_repeats: int,
               min_free: int) -> CaseResult:
    if anchor_repeats == 0:
        anchor = None
    ckpt = ensure_checkpoint(work, case)
    inputs = sorted(ckpt.glob("consolidated.*.pth"))
    res = CaseResult(case, sum(p.stat().st_size for p in inputs))
    out = work / "out"
    env = dict(os.environ, TMPDIR=str(work / "tmp"))
    (work / "tmp").mkdir(exist_ok=True)
    names = list(commands(case, ckpt, out, anchor))
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # alternate who goes first
        for name in order:
            if name == "transformers" and len(res.runs.get(name, [])) >= anchor_repeats:
                continue
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "tmp", ignore_errors=True)
            (work / "tmp").mkdir()
            if name == "cp+sync":
                out.mkdir()
            subprocess.run(["sync"], check=True)
            evict(inputs)
            log = work / f"{case}-{name}-{rep}.log"
            r = run_child(commands(case, ckpt, out, anchor)[name], min_free, env=env, log=log)
            res.runs.setdefault(name, []).append(r)
            print(f"[bench] {case:7s} {name:12s} rep {rep}: {r.seconds:7.2f} s  peak RSS {r.peak_rss / GB:6.2f} GB  {r.status}",
                  flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return res


def _best(runs: list[Run]) -> Run | None:
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return None
    return Run(statistics.median(r.seconds for r in ok), max(r.peak_rss for r in ok), "ok")


def table(results: list[CaseResult], bare: int) -> tuple[str, list[str]]:
    head = ("| case | model bytes | cp+sync s | ours s | ours / cp | ours weights-only s | weights-only / cp "
            "| transformers s | transformers / ours "
            "| ours peak RSS | RSS / model | RSS above bare torch | transformers peak RSS |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    verdicts = []
    for r in results:
        cp, ours, ow = _best(r.runs["cp+sync"]), _best(r.runs["ours"]), _best(r.runs["ours-weights"])
        all_ow = ", ".join(f"{x.seconds:.1f}" for x in r.runs["ours-weights"])
        trf_runs = r.runs.get("transformers", [])
        trf = _best(trf_runs)
        if trf:
            trf_s, trf_ratio, trf_rss = f"{trf.seconds:.1f}", f"{trf.seconds / ours.seconds:.1f}x", f"{trf.peak_rss / GB:.2f} GB"
        elif trf_runs:
            trf_s, trf_ratio, trf_rss = "failed", "-", f"{max(x.peak_rss for x in trf_runs) / GB:.2f} GB ({trf_runs[0].status})"
        else:
            trf_s = trf_ratio = trf_rss = "not run"
        all_ours = ", ".join(f"{x.seconds:.1f}" for x in r.runs["ours"])
        all_cp = ", ".join(f"{x.seconds:.1f}" for x in r.runs["cp+sync"])
        lines.append(
            f"| {r.case} | {r.model_bytes / GB:.2f} GB | {cp.seconds:.1f} ({all_cp}) | {ours.seconds:.1f} ({all_ours}) "
            f"| {ours.seconds / cp.seconds:.2f} | {ow.seconds:.1f} ({all_ow}) | {ow.seconds / cp.seconds:.2f} | {trf_s} | {trf_ratio} | {ours.peak_rss / GB:.2f} GB "
            f"| {100 * ours.peak_rss / r.model_bytes:.1f}% | {(ours.peak_rss - bare) / GB:.2f} GB | {trf_rss} |")
        verdicts.append(f"- {r.case}: wall {ours.seconds / cp.seconds:.2f}x cp+sync (goal <= 1.3x: "
                        f"{'holds' if ours.seconds <= 1.3 * cp.seconds else 'MISSED'}; weights only "
                        f"{ow.seconds / cp.seconds:.2f}x: {'holds' if ow.seconds <= 1.3 * cp.seconds else 'MISSED'}); RSS "
                        f"{100 * ours.peak_rss / r.model_bytes:.1f}% of model bytes, "
                        f"{(ours.peak_rss - bare) / GB:.2f} GB above bare torch (goal <= 10% for 8B and <= 1.5 GB: "
                        f"{'holds' if ours.peak_rss - bare <= 1.5 * GB and (r.case != '8b' or ours.peak_rss <= 0.1 * r.model_bytes) else 'MISSED'}); "
                        + (f"transformers {trf.seconds / ours.seconds:.1f}x slower" if trf else
                           f"transformers: {trf_runs[0].status}" if trf_runs else "transformers not run"))
    return "\n".join(lines), verdicts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Benchmark Meta->HF conversion (see module docstring).")
    ap.add_argument("--anchor", type=Path, help="transformers' convert_llama_weights_to_hf.py (patched for transformers 5)")
    ap.add_argument("--work", type=Path, default=Path("/work/bench-tmp"), help="scratch dir for checkpoints and outputs")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=2, help="runs per contender (alternating order)")
    ap.add_argument("--anchor-repeats", type=int, default=2,
                    help="max runs of transformers' script per case (it is run once on 8b regardless)")
    ap.add_argument("--anchor-cases", default=",".join(CASES),
                    help="cases on which to run transformers' script (e.g. leave out 8b once it has been measured)")
    ap.add_argument("--min-free", type=float, default=1.5, help="GB of available memory below which a child is killed")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    ap.add_argument("--clean", action="store_true", help="delete the generated checkpoints afterwards")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    os.chdir(a.work)  # df, relative temp files: all on the benchmark's disk
    bare = bare_torch_rss()
    print(f"[bench] bare python+torch peak RSS {bare / GB:.2f} GB", flush=True)
    results = []
    for case in a.cases.split(","):
        results.append(bench_case(case, a.work, a.anchor, a.repeats,
                                  0 if case not in a.anchor_cases.split(",") else 1 if case == "8b" else a.anchor_repeats,
                                  int(a.min_free * GB)))
    tab, verdicts = table(results, bare)
    cmd = "python -m benchmarks.run " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    report = (f"Machine: {machine()}\n\nCommand: `{cmd}`\n\nBare `python -c 'import torch'` peak RSS: {bare / GB:.2f} GB.\n"
              f"Seconds are the median of the runs listed in parentheses, each including the final `sync`; "
              f"RSS is the largest peak of those runs.\n\n{tab}\n\n" + "\n".join(verdicts) + "\n")
    print(report)
    (a.work / "last-results.json").write_text(json.dumps(
        {r.case: {"model_bytes": r.model_bytes, "runs": {k: [v.__dict__ for v in vs] for k, vs in r.runs.items()}}
         for r in results}, indent=1))
    if not a.no_write:
        _write_results(a.results, report)
    if a.clean:
        shutil.rmtree(a.work / "ckpt", ignore_errors=True)


_BEGIN, _END = "<!-- benchmark table: begin -->", "<!-- benchmark table: end -->"


def _write_results(path: Path, report: str) -> None:
    """Replace the generated block of RESULTS.md, keeping the hand-written notes around it."""
    text = path.read_text() if path.exists() else f"# Conversion benchmark\n\n{_BEGIN}\n{_END}\n"
    if _BEGIN not in text:
        text += f"\n{_BEGIN}\n{_END}\n"
    pre, rest = text.split(_BEGIN, 1)
    post = rest.split(_END, 1)[1]
    path.write_text(f"{pre}{_BEGIN}\n{report}{_END}{post}")


if __name__ == "__main__":
    main()

"""verify across processes: 2 CPU ranks over loopback (gloo) judge a tiny MP2 checkpoint.

`llama-parity verify --nproc 2` starts torchrun's launcher; each rank streams its range of decoder
layers of both models, as the single-process streamed verify streams them all
(llama_parity/distributed.py). Here: failures. A rank that cannot read its shard, or that dies while
the others wait in a collective, must stop every rank with one line; a signal reaching the ranks
while one waits in a collective for another ends the run at once, as single-process verify ends. Every run is bounded by a
subprocess timeout; process start and the torch import dominate the cost. Elsewhere:
test_verify_paths.py runs every verify option through this path (the report is the single-process
one, number for number; a mutant fails in the same checks; the HTML report), test_mutations.py every
catalog entry (and a rank crashing as it exits after the verdict).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


VARIANT, SHARDS = "llama3.1-70b", 2  # GQA, vocab-parallel embedding, RoPE scaling: one rank per shard
TIMEOUT = 120


def _verify_2ranks(meta, hf, *extra, env=None):
    """`verify --nproc 2` in its own session, killed whole if it outlives the timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "llama_parity", "verify", "--nproc", "2", "--meta-dir", str(meta),
           "--hf-dir", str(hf), "--no-tokenizer", "--timeout", "60", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        _gone(p.pid)
    return p.returncode, out, err


def _gone(pgid: int) -> bool:
    """True when no process of the run's session is left; kills leftovers so none outlive the test."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return False


def test_failing_rank_stops_all_with_one_line(tiny, tmp_path):
    """Bug class: one rank dying (here: its shard file truncated, as by an interrupted download) leaving
    the others blocked in a collective, a traceback instead of an actionable line, or exit code 0."""
    import shutil

    meta = shutil.copytree(tiny.meta(VARIANT, SHARDS), tmp_path / "meta")
    shard = meta / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, out, err = _verify_2ranks(meta, tiny.hf(VARIANT, SHARDS))
    lines = err.strip().splitlines()
    assert code == 2
    # verify's input checks (converter/input_checks.py) now refuse an unloadable shard before any
    # rank starts; the promise is the same: one line naming the file, exit 2, nobody left blocked.
    assert len(lines) == 1 and lines[0].startswith("llama-parity: ") and "consolidated.01.pth" in lines[0], err
    assert "Traceback" not in err and out == ""


def test_rank_failing_mid_run_stops_the_others(tiny, tmp_path):
    """Bug class: a rank dying while the others wait for it inside a collective (a GPU fault, an
    out-of-memory kill on one node) leaving them blocked, or the failure lost (exit 0, no line).
    Rank 1 is made to fail by the test's own sitecustomize (rank_faults.py), not by a product hook."""
    from llama_parity.parity_tests.rank_faults import FAIL_MESSAGE, rank_fault_env

    # --timeout beyond the subprocess timeout: only the launcher stopping rank 0 can end the run in time
    code, out, err = _verify_2ranks(tiny.meta(VARIANT, SHARDS), tiny.hf(VARIANT, SHARDS), "--timeout", str(3 * TIMEOUT),
                                    "--quick", env=rank_fault_env(tmp_path / "site", "fail"))
    lines = err.strip().splitlines()
    assert code == 2
    assert lines == [f"llama-parity: rank 1: RuntimeError: {FAIL_MESSAGE}"], err
    assert out == ""


def test_bad_input_under_torchrun_is_one_line(tiny, tmp_path):
    """Bug class: under torchrun's launcher (`python -m llama_parity.torchrun`, which cannot check the
    folders before the ranks start as --nproc does) a damaged file that every rank reads printed one
    line per rank, or torch's failure summary, or ended with another code than 2 (bad input)."""
    import shutil

    hf = shutil.copytree(tiny.hf(VARIANT, SHARDS), tmp_path / "hf")
    (hf / "generation_config.json").write_text("{")  # a truncated download
    cmd = [sys.executable, "-m", "llama_parity.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "llama_parity",
           "verify", "--meta-dir", str(tiny.meta(VARIANT, SHARDS)), "--hf-dir", str(hf), "--no-tokenizer"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        _gone(p.pid)
    lines = err.strip().splitlines()
    assert p.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("llama-parity: ") and "generation_config.json" in lines[0], err
    assert out == ""


def test_signal_while_a_rank_waits_for_another(tiny, tmp_path):
    """Bug class: a signal (here SIGTERM to the whole run, as `kill -TERM -PGID`, Slurm or systemd send
    it) reaching the ranks while rank 1 is blocked inside a collective, waiting for rank 0 that is still
    computing: a rank that does not answer (blocked, or ignoring the signal) keeps the run alive until
    torchrun's agent kills it 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) or the collective times out,
    a rank left running, a traceback or several lines instead of one, another code than 143, a report
    half-written. Rank 0's long computation and rank 1's wait are the test's own (rank_faults.py
    "stall"); with rank 0 ignoring signals ("stall-deaf") the run ends only when the agent kills it."""
    import time
    from pathlib import Path

    from llama_parity.parity_tests.rank_faults import rank_fault_env
    from llama_parity.parity_tests.test_verify_paths import _alive, _children

    site, report = tmp_path / "site", tmp_path / "out" / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", **rank_fault_env(site, "stall"))
    cmd = [sys.executable, "-m", "llama_parity.torchrun", "--standalone", "--nproc-per-node", "2", "-m", "llama_parity",
           "verify", "--meta-dir", str(tiny.meta(VARIANT, SHARDS)), "--hf-dir", str(tiny.hf(VARIANT, SHARDS)),
           "--no-tokenizer", "--quick", "--timeout", "300", "--json", str(report)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((site / "computing").exists() and (site / "waiting").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [k for k in _children(p.pid) if b"llama_parity" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert len(ranks) == 2 and p.poll() is None, "the ranks did not reach the collective"
        time.sleep(1.0)  # rank 1 is now inside the broadcast, not on its way to it
        start = time.monotonic()
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=TIMEOUT)
        took = time.monotonic() - start
    finally:
        _gone(p.pid)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["llama-parity: interrupted by SIGTERM; nothing was left half-written, "
                                        "inputs untouched"], err
    assert out == "" and not any(_alive(r) for r in ranks)
    assert not report.parent.exists() or not any(report.parent.iterdir())
    assert took < 15, f"the run took {took:.0f} s to end: a rank did not answer the signal (the agent killed it)"

"""verify across processes: 2 CPU ranks over loopback (gloo) judge a tiny MP2 checkpoint.

`llama-parity verify --nproc 2` starts torchrun's launcher; each rank streams its range of decoder
layers of both models, as the single-process streamed verify streams them all
(llama_parity/distributed.py). Here: failures. A rank that cannot read its shard, or that dies while
the others wait in a collective, must stop every rank with one line. Every run is bounded by a
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

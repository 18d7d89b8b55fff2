"""verify across processes: 2 CPU ranks over loopback (gloo) judge a tiny MP2 checkpoint.

`llama-parity verify --nproc 2` starts torchrun's launcher; each rank streams its range of decoder
layers of both models, as the single-process streamed verify streams them all
(llama_parity/distributed.py). The report must be the single-process one, number for number, a
mutant must fail in the same check, and a rank that cannot read its shard must stop every rank with
one line. Every run is bounded by a subprocess timeout; process start and the torch import dominate
the cost. test_verify_paths.py runs every verify option through this path.
"""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys


from llama_parity.mutations import BY_NAME, mutate_copy
from llama_parity.verify import verify

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


def _checks(report: dict) -> list[tuple[str, bool, float, float]]:
    return [(c["name"], c["ok"], c["measured"], c["bound"]) for c in report["checks"]]


def test_two_ranks_report_equals_single_process(tiny, tmp_path):
    """Bug class: the distributed path computing something else than verify (a check dropped or renamed,
    hidden states handed to the wrong rank or overwritten by the next range's, a layer range lost or
    run twice): the same operations on the same values give the single-process numbers exactly."""
    meta, hf = tiny.meta(VARIANT, SHARDS), tiny.hf(VARIANT, SHARDS)
    page = tmp_path / "d.html"
    code, out, err = _verify_2ranks(meta, hf, "--json", str(tmp_path / "d.json"), "--html", str(page))
    assert code == 0, err
    assert "PARITY OK" in out and "distributed over 2 ranks (gloo)" in out
    dist = _checks(json.loads((tmp_path / "d.json").read_text()))
    _assert_html_report(out, page, [c[0] for c in dist])
    single = _checks(verify(meta, hf, tokenizer=False, memory="streaming").to_dict())
    assert dist == single


def _assert_html_report(out: str, page, names: list[str]) -> None:
    """Bug class: `verify --nproc N --html PATH` (rank 0) silently writing no report, or one without
    the checks the distributed run judged (the single-process path wrote it, the distributed one not)."""
    assert f"report: {page}" in out and page.is_file()
    text = page.read_text()
    assert "PARITY OK" in text and all(html.escape(n) in text for n in names), names
    assert "hidden state after each layer, streamed" in text  # the per-layer chart, from the ranks' rows


def test_mutant_fails_in_the_same_check(tiny, tmp_path):
    """Bug class: a distributed run that passes a broken conversion single-process verify fails, or
    fails it in another check (e.g. wk permuted with n_heads, only visible through the HF layers)."""
    mutation = BY_NAME["k_permuted_with_n_heads"]
    hf = tiny.hf(VARIANT, SHARDS)
    assert mutation.applies(json.loads((hf / "config.json").read_text()))
    broken = mutate_copy(hf, tmp_path / "broken", mutation)
    meta = tiny.meta(VARIANT, SHARDS)
    code, out, err = _verify_2ranks(meta, broken, "--no-bf16", "--json", str(tmp_path / "d.json"))
    assert code == 1, err
    assert "PARITY FAILED" in out
    failed = {c["name"] for c in json.loads((tmp_path / "d.json").read_text())["checks"] if not c["ok"]}
    single = verify(meta, broken, bf16=False, tokenizer=False)
    assert failed == {c.name for c in single.checks if not c.ok}
    assert failed & set(mutation.caught_by)


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


def test_rank_failing_mid_run_stops_the_others(tiny):
    """Bug class: a rank dying while the others wait for it inside a collective (a GPU fault, an
    out-of-memory kill on one node) leaving them blocked, or the failure lost (exit 0, no line)."""
    from llama_parity.distributed import FAULT_ENV

    # --timeout beyond the subprocess timeout: only the launcher stopping rank 0 can end the run in time
    code, out, err = _verify_2ranks(tiny.meta(VARIANT, SHARDS), tiny.hf(VARIANT, SHARDS), "--timeout", str(3 * TIMEOUT),
                                    env={FAULT_ENV: "1"})
    lines = err.strip().splitlines()
    assert code == 2
    assert lines == [f"llama-parity: rank 1: RuntimeError: failure injected by {FAULT_ENV}=1"], err
    assert out == ""

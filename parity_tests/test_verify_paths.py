"""One verdict whatever the path: every verify option reaches single-process full, streamed, --nproc
and the pytest plugin.

`llama-parity verify` builds one VerifyOptions from its command line (cli.options_from_args) and
hands it to whichever path runs: both models in memory (--memory full), one layer at a time (the
default), or torchrun ranks (--nproc N: the options reach every rank as JSON). Each option set
below runs through the four paths on one tiny MP2 checkpoint and must give the same rows, the
same verdict per row and the same exit code, and the streamed paths (one process, two ranks, the
plugin's `pytest --pyargs llama_parity.parity_tests --meta-dir M --hf-dir H FLAGS`, run in this
process) the same numbers. 2-rank launches cost seconds each (process start, torch and transformers
imports), so the option sets are combined (each carries several options at once, one of them on a
mutant) and every 2-rank judgement of this module, every catalog entry and benign twin included,
shares one launch (the two_ranks fixture). The launchers (`--nproc`, `python -m
llama_parity.torchrun`) also answer signals as single-process verify does (one line, 128+signal).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llama_parity.cli import main
from llama_parity.parity_tests.test_mutations import bf16_tiny  # noqa: F401 (a fixture: tiny bf16 checkpoints)

VARIANT, SHARDS = "llama3.1-70b", 2  # GQA, vocab-parallel embedding, RoPE scaling: one rank per shard
TIMEOUT = 300  # generous: on a machine shared with other test runs a 2-rank launch took 2 minutes

# Flags combined per launch (and the folder they judge): every verify option is in one of them.
OPTION_SETS = {
    # a conversion that changed the dtype (fp32 -> bf16), every check (kv cache, greedy, bf16): judged
    # against the rounding it implies, the same numbers in both streamed paths; --instruct on a base
    # release: the chat metadata rows fail in every path alike; the tokenizer; the HTML report
    "bf16-folder instruct greedy3 html": ("bf16", ["--instruct", "--greedy-tokens", "3", "--html", "{html}"]),
    # a broken conversion (wk permuted with n_heads, visible only through the HF layers): the same
    # failed checks in every path
    "mutant base quick no-bf16 variant": ("mutant", ["--base", "--quick", "--no-bf16", "--variant", VARIANT,
                                                     "--no-tokenizer"]),
    "metadata-only no-tokenizer": ("as-stored", ["--metadata-only", "--no-tokenizer"]),
}
MUTANT = "k_permuted_with_n_heads"


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory) -> dict[str, Path]:
    from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf
    from llama_parity.mutations import BY_NAME, mutate_copy

    meta, hf = tiny.meta(VARIANT, SHARDS), tiny.hf(VARIANT, SHARDS)
    bf16 = tmp_path_factory.mktemp("bf16") / "hf"
    convert_meta_to_hf(meta, bf16, ConvertOptions(dtype=torch.bfloat16, progress=False))
    assert BY_NAME[MUTANT].applies(json.loads((hf / "config.json").read_text()))
    mutant = mutate_copy(hf, tmp_path_factory.mktemp("mutant") / "hf", BY_NAME[MUTANT])
    return {"meta": meta, "as-stored": hf, "bf16": bf16, "mutant": mutant}


def _rows(report: dict) -> list[tuple[str, bool]]:
    rows = [(c["name"], c["ok"]) for c in report["checks"]]
    tok = report["tokenizer"]
    return rows + ([] if tok is None else [("tokenizer", tok["ok"])]) + [("verdict", report["ok"])]


def _numbers(report: dict) -> list[tuple[str, bool, float, float]]:
    return [(c["name"], c["ok"], c["measured"], c["bound"]) for c in report["checks"]]


def _single(meta: Path, hf: Path, flags: list[str], memory: str, out: Path) -> tuple[int, dict]:
    flags = [f.replace("{html}", str(out.with_suffix(".html"))) for f in flags]
    code = main(["verify", "--meta-dir", str(meta), "--hf-dir", str(hf), "--memory", memory, *flags,
                 "--json", str(out)])
    return code, json.loads(out.read_text())


def _plugin(meta: Path, hf: Path, flags: list[str]) -> tuple[int, dict]:
    """The pytest plugin's path, as a user runs it (`pytest --pyargs llama_parity.parity_tests
    --meta-dir M --hf-dir H FLAGS`), in this process: its exit code and the report its verdict test
    judged by (the flags the plugin does not take dropped: pytest_plugin.NOT_OFFERED says why)."""
    from llama_parity.parity_tests.test_plugin_verdict import REPORT_PROPERTY
    from llama_parity.pytest_plugin import NOT_OFFERED

    kept, it = [], iter(flags)
    for f in it:
        if f in NOT_OFFERED:
            next(it)  # its value
        else:
            kept.append(f)
    got = []

    class Reports:
        def pytest_runtest_logreport(self, report):
            if report.when == "call":
                got.extend(v for k, v in report.user_properties if k == REPORT_PROPERTY)

    # addopts off (no xdist workers); modules this process imported already cannot be rewritten: not news
    code = pytest.main(["--pyargs", "llama_parity.parity_tests.test_plugin_verdict", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                        "--meta-dir", str(meta), "--hf-dir", str(hf), *kept], plugins=[Reports()])
    assert len(got) == 1, f"the plugin's verdict test ran {len(got)} times (exit {code})"
    return int(code), got[0]


def _launch(meta: Path, hf: Path, *extra: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_parity", "verify", "--nproc", "2", "--meta-dir", str(meta),
           "--hf-dir", str(hf), "--timeout", "200", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True, **kw)


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return p.returncode, out, err


@pytest.fixture(scope="module")
def two_ranks(folders, tiny, bf16_tiny, tmp_path_factory) -> dict:
    """Every folder this module judges with 2 ranks, in one launch (distributed.launch_many: the
    ranks' code of `verify --nproc 2`, several folders in one process group), so that the rank
    start-up and the torch and transformers imports are paid once: the option sets (each with the
    VerifyOptions its command line builds, cli.options_from_args), then every catalog entry and
    benign twin (test_every_fault_with_two_ranks). Rank 1 aborts as it exits (rank_faults.py)."""
    from llama_parity.cli import build_parser, options_from_args
    from llama_parity.distributed import launch_many
    from llama_parity.parity_tests.rank_faults import rank_fault_env
    from llama_parity.verify import VerifyOptions

    root = tmp_path_factory.mktemp("ranks")
    jobs, sets = [], {}
    for name, (kind, flags) in OPTION_SETS.items():
        page = root / f"{len(sets)}.html"
        argv = ["verify", "--meta-dir", str(folders["meta"]), "--hf-dir", str(folders[kind]), "--nproc", "2",
                *[f.replace("{html}", str(page)) for f in flags]]
        opts = replace(options_from_args(build_parser().parse_args(argv)), timeout=300)
        sets[name] = (opts, page)
        jobs.append((folders["meta"], folders[kind], replace(opts, nproc=None)))
    catalog = _catalog_jobs(tiny, bf16_tiny, root)
    jobs += [job for job, _ in catalog]
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        for k, v in {**rank_fault_env(root / "site", "abort-at-exit"), "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(k, v)
        got = launch_many(jobs, VerifyOptions(nproc=2, timeout=300))
    assert isinstance(got, list) and len(got) == len(jobs), stderr.getvalue()
    return {"sets": {name: (*sets[name], g) for name, g in zip(sets, got)}, "stderr": stderr.getvalue(),
            "catalog": [(entry, v, g) for (_, (entry, v)), g in zip(catalog, got[len(sets):])]}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_every_path_gives_the_same_verdicts(folders, two_ranks, tmp_path, name):
    """Bug class: a path (single-process full or streamed, --nproc 2, the pytest plugin) that drops
    or changes an option (the declared dtype change's rounding,
    --instruct/--base, --quick, --metadata-only, --greedy-tokens, --no-tokenizer, --no-bf16, --html),
    so that one conversion passes in one path and fails in another, or is judged by other rows; the
    distributed path computing something else than the streamed one (a check dropped or renamed, hidden
    states handed to the wrong rank, a layer range lost or run twice: the same operations on the same
    values give the same numbers); a mutant the ranks pass or fail in another check; `--json -` with
    --nproc losing the table (it goes to stderr, stdout holds the JSON alone)."""
    from llama_parity.distributed import _emit

    kind, flags = OPTION_SETS[name]
    meta, hf = folders["meta"], folders[kind]
    opts, page, got = two_ranks["sets"][name]
    # Each rank ran one thread (OMP_NUM_THREADS=1 above); so do the paths run here: on some CPUs (this
    # project's AVX-512 Xeons) a product's last bits depend on how many threads split it, which would
    # make equal operations on equal values differ by 1e-7 between paths (not a path's bug).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = _single(meta, hf, flags, "full", tmp_path / "full.json")
        streamed = _single(meta, hf, flags, "streaming", tmp_path / "streamed.json")
        plugin = _plugin(meta, hf, flags)
    finally:
        torch.set_num_threads(threads)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(err):  # as cli._run does for `--json -`
        code = _emit(got, replace(opts, json="-"), out)  # how `verify --nproc 2` ends with this report
    err = err.getvalue()
    dist = json.loads(out.getvalue())  # --json -: stdout holds the JSON alone, the table went to stderr
    assert dist["verdict"] in err and "distributed over 2 ranks (gloo)" in err  # e.g. METADATA OK: no model ran
    assert full[1]["verdict"] == streamed[1]["verdict"] == dist["verdict"] == plugin[1]["verdict"], name
    assert _rows(full[1]) == _rows(streamed[1]) == _rows(dist) == _rows(plugin[1]), name
    assert full[0] == streamed[0] == code == plugin[0]  # pytest: 0 passed, 1 the verdict test failed
    assert _numbers(streamed[1]) == _numbers(dist) == _numbers(plugin[1]), name
    if "{html}" in flags:
        _assert_html_report(err, page, dist)
        for path, (_, rep) in ((tmp_path / "full.html", full), (tmp_path / "streamed.html", streamed)):
            _assert_page(path, rep)  # the single-process paths' own pages (--html reached them too)
    if kind == "mutant":
        from llama_parity.mutations import BY_NAME

        assert dist["verdict"] == "PARITY FAILED"
        assert {c for c, ok in _rows(dist) if not ok} & set(BY_NAME[MUTANT].caught_by)


def _catalog_jobs(tiny, bf16_tiny, root: Path) -> list:
    """((meta, hf, options), (entry, layout)) for every catalog entry on every layout and every
    benign twin: --quick (fp32 logits and far positions, every metadata check, the byte check), the
    tokenizer's entries --metadata-only with the tokenizer check: the scopes test_mutations.py judges
    them in (the tokenizer's benign twins --quick, as every twin: they must pass with the models run)."""
    from llama_parity.mutations import BENIGN, CATALOG, mutate_copy
    from llama_parity.verify import VerifyOptions

    quick = VerifyOptions(bf16=False, tokenizer=False, checks="quick", timeout=300)
    # a tokenizer fault leaves weights and config Meta's: judged as single-process judges it, with no
    # model run (rank 0 alone judges, as it alone runs the tokenizer check in every scope)
    tokenizer = replace(quick, checks="metadata", tokenizer=True)
    jobs = [((tiny.meta(v), mutate_copy(tiny.hf(v), root / f"m{i}", m), tokenizer if m.tokenizer else quick), (m, v))
            for i, (m, v) in enumerate((m, v) for m in CATALOG for v in m.layouts)]
    for i, b in enumerate(BENIGN):
        v = b.layouts[0]
        meta, hf = bf16_tiny(v) if b.meta_dtype == torch.bfloat16 else (tiny.meta(v), tiny.hf(v))
        jobs.append(((meta, mutate_copy(hf, root / f"b{i}", b), replace(quick, tokenizer=b.tokenizer)), (b, v)))
    return jobs


def test_every_fault_with_two_ranks(two_ranks):
    """Bug class: a fault class that `verify --nproc 2` passes while single-process verify fails it
    (a check the ranks drop or rename, a mode they ignore, hidden states relayed to the wrong rank), a
    benign twin the ranks fail; and a rank whose exit crashes after the verdict (gloo teardown:
    "terminate called without an active exception") turning that verdict into a failed run. Every
    catalog entry on every layout is judged with the model checks running (--quick; the tokenizer's
    entries --metadata-only with the tokenizer check, which rank 0 alone runs) and must fail every check
    its entry names; every benign twin must pass with the models run (single-process:
    test_mutations.py). Rank 1 aborted as it exited: the verdicts stand."""
    from llama_parity.mutations import BENIGN
    from llama_parity.parity_tests.test_mutations import _assert_caught

    assert "rank 1 ended with signal 6 after the report was complete" in two_ranks["stderr"]
    for entry, v, g in two_ranks["catalog"]:
        assert "distributed over 2 ranks" in g["text"]
        assert g["report"]["scope"] == ("metadata" if getattr(entry, "tokenizer", False) and entry not in BENIGN
                                        else "quick")
        if entry in BENIGN:
            assert g["ok"], f"{entry.name} failed with 2 ranks on {v}\n{g['text']}"
            assert g["report"]["models_run"], f"{entry.name}: the model checks did not run with 2 ranks"
            continue
        _assert_caught(entry, v, g["report"])


def _assert_page(page: Path, report: dict) -> None:
    """The HTML page a path wrote holds its verdict and every check it judged."""
    import html

    assert page.is_file(), f"--html given, no page at {page}"
    text = page.read_text()
    assert report["verdict"] in text and all(html.escape(c["name"]) in text for c in report["checks"]), page


def _assert_html_report(err: str, page: Path, report: dict) -> None:
    """Bug class: `verify --nproc N --html PATH` (rank 0) silently writing no report, or one without
    the checks the distributed run judged (the single-process path wrote it, the distributed one not)."""
    assert f"report: {page}" in err
    _assert_page(page, report)
    assert "hidden state after each layer, streamed" in page.read_text()  # the per-layer chart, from the ranks' rows


# A value for each verify flag that is not its default (store_true flags need none).
# Flags that choose another judgement than verify's paths (no rank, no stream): they are not options
# of this one. --attestation re-checks a folder against a report; --gguf judges a llama.cpp file.
_OTHER_JUDGES = ("attestation", "gguf")
_NON_DEFAULT = {"--device": "cuda", "--variant": "llama3.1-8b", "--memory": "full", "--greedy-tokens": "3",
                "--json": "-", "--html": "r.html", "--nproc": "2", "--timeout": "5"}


def test_every_verify_flag_reaches_the_options():
    """Bug class: a verify flag added to the command line but not to VerifyOptions (or read from
    args somewhere else), so that some path (ranks, streamed, the plugin) never sees it."""
    from llama_parity.cli import build_parser, options_from_args
    from llama_parity.verify import VerifyOptions

    base = ["verify", "--meta-dir", "m", "--hf-dir", "h"]
    parser = build_parser()
    default = options_from_args(parser.parse_args(base))
    verify_parser = parser.parse_args(base).verify_parser
    for action in verify_parser._actions:
        if not action.option_strings or action.dest in ("help", "meta_dir", "hf_dir", *_OTHER_JUDGES):
            continue
        flag = action.option_strings[0]
        extra = [flag] if action.nargs == 0 else [flag, _NON_DEFAULT[flag]]
        opts = options_from_args(parser.parse_args(base + extra))
        assert opts != default, f"{flag} does not reach VerifyOptions"
        assert VerifyOptions.from_json(opts.to_json()) == opts  # what the ranks receive


class _PluginParser:
    """What the plugin's pytest_addoption adds, into a plain argparse parser (pytest's own Parser
    is not public)."""

    def __init__(self):
        import argparse

        self.ap = argparse.ArgumentParser(exit_on_error=False)

    def getgroup(self, name):
        return self

    def addoption(self, *names, **kw):
        self.ap.add_argument(*names, **kw)


def test_the_plugin_takes_every_judging_flag():
    """Bug class: a verify flag that changes what is judged (--instruct/--base, --quick,
    --metadata-only, --no-bf16, --memory, ...) that the pytest plugin does not take, or builds into
    other options than verify's, so that `pytest --pyargs llama_parity.parity_tests --meta-dir M`
    judges otherwise than `llama-parity verify --meta-dir M` (only NOT_OFFERED may differ)."""
    from types import SimpleNamespace

    from llama_parity.cli import build_parser, options_from_args
    from llama_parity.pytest_plugin import NOT_OFFERED, pytest_addoption, verify_options_of

    plugin = _PluginParser()
    pytest_addoption(plugin)
    parser = build_parser()
    base = ["verify", "--meta-dir", "m", "--hf-dir", "h"]
    for action in parser.parse_args(base).verify_parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag is None or action.dest in ("help", "meta_dir", "hf_dir") or flag in NOT_OFFERED:
            continue
        for extra in ([flag] if action.nargs == 0 else [flag, _NON_DEFAULT[flag]]), []:
            cli = options_from_args(parser.parse_args(base + extra))
            ours = verify_options_of(SimpleNamespace(option=plugin.ap.parse_args(["--meta-dir", "m", *extra])))
            assert ours == replace(cli, json=None, html=None, nproc=None, timeout=ours.timeout), flag


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# (launcher, signal, sent to): each signal once, each launcher, the agent alone (kill, timeout,
# systemd) or the whole process group (Ctrl-C in a terminal, a closed terminal's SIGHUP).
SIGNAL_CASES = [("--nproc", signal.SIGTERM, "agent"), ("--nproc", signal.SIGHUP, "group"),
                ("torchrun", signal.SIGINT, "group")]


@pytest.mark.parametrize("launcher,sig,target", SIGNAL_CASES, ids=lambda x: getattr(x, "name", x))
def test_launchers_answer_signals_like_single_process(folders, tmp_path, launcher, sig, target):
    """Bug class: `verify --nproc N`, or torchrun's launcher as the README runs it
    (`python -m llama_parity.torchrun ...`, torchrun's own arguments), stopped by a signal and
    answering with torch's traceback and exit 1 (the "parity failed" code), with one line per rank
    (each told by the terminal and again by the agent), or leaving ranks running or a report file
    half-written; instead of single-process verify's one line and 128+signal (130/143/129)."""
    report = tmp_path / "out" / "r.json"
    args = ["--meta-dir", str(folders["meta"]), "--hf-dir", str(folders["as-stored"]), "--no-tokenizer",
            "--timeout", "200", "--json", str(report)]
    if launcher == "--nproc":
        p = _launch(folders["meta"], folders["as-stored"], "--no-tokenizer", "--json", str(report))
    else:
        cmd = [sys.executable, "-m", "llama_parity.torchrun", "--standalone", "--nproc-per-node", "2",
               "-m", "llama_parity", "verify", *args]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline, ranks = time.monotonic() + 60, []
    # The agent's ranks are its children, counted once they run their own command line: a child
    # still between fork and exec has the agent's, and a signal it gets then is lost in the exec (its
    # handlers are the agent's copy), so that rank would run to its report.
    launcher = _cmdline(p.pid)
    while time.monotonic() < deadline and len(ranks) < 2:
        ranks = [k for k in _children(p.pid) if (c := _cmdline(k)) != launcher and b"llama_parity" in c]
        time.sleep(0.2)
    assert len(ranks) == 2, "the ranks did not start"
    os.killpg(p.pid, sig) if target == "group" else p.send_signal(sig)
    code, out, err = _finish(p)
    assert code == 128 + sig, err
    assert err.strip().splitlines() == [f"llama-parity: interrupted by {sig.name}; nothing was left half-written, "
                                        "inputs untouched"], err
    assert out == ""
    assert not any(_alive(r) for r in ranks)
    assert not report.parent.exists() or not any(report.parent.iterdir())


def test_signal_while_the_command_line_is_parsed(tmp_path):
    """Bug class: a signal reaching `python -m llama_parity verify` while it still parses its command
    line (a torchrun rank starting up when Ctrl-C stops the run: the suite met it under load), before
    the handlers are installed: a KeyboardInterrupt traceback on the terminal instead of one line and
    130. The test's own sitecustomize sends SIGINT from inside build_parser."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, importlib.util, os, signal, sys\n"
        "class F(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name != 'llama_parity.cli':\n"
        "            return None\n"
        "        sys.meta_path.remove(self)\n"
        "        spec = importlib.util.find_spec(name)\n"
        "        run = spec.loader.exec_module\n"
        "        def exec_module(m):\n"
        "            run(m)\n"
        "            build = m.build_parser\n"
        "            def interrupted_build():\n"
        "                os.kill(os.getpid(), signal.SIGINT)\n"
        "                return build()\n"
        "            m.build_parser = interrupted_build\n"
        "        spec.loader.exec_module = exec_module\n"
        "        return spec\n"
        "sys.meta_path.insert(0, F())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    p = subprocess.run([sys.executable, "-m", "llama_parity", "verify", "--meta-dir", "m", "--hf-dir", "h"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == ["llama-parity: interrupted by SIGINT; nothing was left half-written, "
                                             "inputs untouched"], p.stderr


def test_signal_turned_into_another_error_by_an_import(tmp_path):
    """Bug class: a signal reaching `verify` while it imports torch (a torchrun rank starting when Ctrl-C
    stops the run: met in the suite): the handler's exception, raised inside a C extension's import,
    came back as "ImportError: cannot load module more than once per process", a traceback and exit 1
    instead of one line and 130. The test's sitecustomize sends SIGINT from inside build_parser and
    turns the interruption into that ImportError, as numpy's import did."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, importlib.util, os, signal, sys\n"
        "class F(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name != 'llama_parity.cli':\n"
        "            return None\n"
        "        sys.meta_path.remove(self)\n"
        "        spec = importlib.util.find_spec(name)\n"
        "        run = spec.loader.exec_module\n"
        "        def exec_module(m):\n"
        "            run(m)\n"
        "            build = m.build_parser\n"
        "            def interrupted_build():\n"
        "                try:\n"
        "                    os.kill(os.getpid(), signal.SIGINT)\n"
        "                except KeyboardInterrupt:\n"
        "                    raise ImportError('cannot load module more than once per process') from None\n"
        "                return build()\n"
        "            m.build_parser = interrupted_build\n"
        "        spec.loader.exec_module = exec_module\n"
        "        return spec\n"
        "sys.meta_path.insert(0, F())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    p = subprocess.run([sys.executable, "-m", "llama_parity", "verify", "--meta-dir", "m", "--hf-dir", "h"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == ["llama-parity: interrupted by SIGINT; nothing was left half-written, "
                                             "inputs untouched"], p.stderr


_SWALLOWED_AT_RANK_START = """
import os, signal, sys
from llama_parity import cli, distributed
real = distributed.Rank.from_env.__func__
def starting(cls, device):
    try:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the rank still imports torch ...
    except KeyboardInterrupt:
        pass  # ... and an import's catch-all swallowed main's Interrupted
    return real(cls, device)
distributed.Rank.from_env = classmethod(starting)
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
sys.exit(cli.main(sys.argv[1:]))
"""


def test_signal_swallowed_while_a_rank_starts_still_stops_it(folders, tmp_path):
    """Bug class: a torchrun rank whose Ctrl-C came while it still imported torch, before its own
    handlers, and was swallowed by that import (main's handler had recorded it): the rank went on, its
    verify met the half-imported modules and rank 0 said "ModuleNotFoundError: Could not import module
    'modeling_llama'" (met in the suite) instead of ending as the signal it was. The child is a rank
    of a one-rank run: it must end with 130 and the one line, no report, no model run."""
    from llama_parity.parity_tests.forked import Forked

    report = tmp_path / "out" / "r.json"
    child = Forked(_SWALLOWED_AT_RANK_START, ["verify", "--meta-dir", str(folders["meta"]), "--hf-dir",
                                              str(folders["as-stored"]), "--no-tokenizer", "--json", str(report)])
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["llama-parity: interrupted by SIGINT; nothing was left half-written, "
                                        "inputs untouched"], err
    assert not report.exists()

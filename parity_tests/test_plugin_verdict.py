"""verify's whole judgement through pytest, on the checkpoints given to it.

    pytest --pyargs llama_parity.parity_tests --meta-dir M [--hf-dir H] [verify's judging flags]

The plugin (llama_parity/pytest_plugin.py) takes the verify flags that change what is judged
(--variant, --instruct/--base, --quick, --metadata-only, --no-bf16, --no-tokenizer, --memory,
--device, --greedy-tokens) and builds the VerifyOptions `llama-parity verify` would build from them,
with verify's own builder (cli.options_from_args). This test runs verify() with them on each given
pair: the same checks, rows and verdict as the command line, passed when verify says PARITY OK (or
METADATA OK), failed with verify's table otherwise. The report rides along as the test's
`llama_parity_report` property (test_verify_paths.py compares it with the other paths'). With no
--meta-dir there is nothing to judge: the test is deselected, not skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPORT_PROPERTY = "llama_parity_report"


def pytest_generate_tests(metafunc):
    if "real_pair" in metafunc.fixturenames:
        metas = metafunc.config.getoption("--meta-dir") or []
        metafunc.parametrize("real_pair", list(range(len(metas))) or [None],
                             ids=[f"real{i}:{Path(p).name}" for i, p in enumerate(metas)] or ["no-meta-dir"])


def test_verify_verdict(real_reports, real_pair, record_property):
    """Bug class: a checkpoint that the pytest path judges with other checks, another twin, scope or
    release than `llama-parity verify` given the same flags (an option the plugin drops or builds
    its own way), so that pytest passes a folder verify fails, or the other way round."""
    report = real_reports(real_pair)
    record_property(REPORT_PROPERTY, report.to_dict())
    if not report.ok:
        pytest.fail("\n" + report.render(), pytrace=False)


def test_narrower_scope_leaves_the_verdict_alone():
    """Bug class: `pytest --pyargs llama_parity.parity_tests --meta-dir M --metadata-only` (or --quick,
    --no-bf16) still running the per-check model tests on M, so pytest runs and judges checks verify
    was told not to run (its verdict then differs from verify's); or the verdict test dropped."""
    from types import SimpleNamespace

    from llama_parity.pytest_plugin import pytest_collection_modifyitems

    def run(flags: dict) -> list[str]:
        option = SimpleNamespace(**{**dict(device="cpu", variant=None, instruct=None, no_bf16=False, no_tokenizer=False,
                                           memory="auto", metadata_only=False, quick=False, greedy_tokens=None),
                                    **flags})
        given = {"--meta-dir": ["M"], "--all-tests": False}
        config = SimpleNamespace(option=option, getoption=lambda name, default=None: given.get(name, default),
                                 hook=SimpleNamespace(pytest_deselected=lambda items: None))
        items = [SimpleNamespace(name=n, callspec=SimpleNamespace(params=p)) for n, p in (
            ("per-check", {"checkpoint": ("real", 0)}), ("verdict", {"real_pair": 0}),
            ("tiny", {"checkpoint": ("tiny", "x")}), ("plain", {}))]
        pytest_collection_modifyitems(config, items)
        return [i.name for i in items]

    assert run({}) == ["per-check", "verdict"]
    for narrower in ({"metadata_only": True}, {"quick": True}, {"no_bf16": True}):
        assert run(narrower) == ["verdict"], narrower


def test_other_projects_runs_load_no_torch(tmp_path):
    """Bug class: the plugin (installed for every pytest run of the environment, pytest11) importing
    torch or the judge in another project's run (seconds per run, and the judge's side effects on
    their tests): only a run given --meta-dir may load them. Its hooks run there too: they must not."""
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (tmp_path / "test_theirs.py").write_text(
        "import sys\n\ndef test_theirs():\n    assert 'torch' not in sys.modules and 'llama_parity.verify' not in "
        "sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'llama_parity')))[:20]\n")
    plugin = [] if any(ep.value == "llama_parity.pytest_plugin" for ep in entry_points(group="pytest11")) \
        else ["-p", "llama_parity.pytest_plugin"]  # a source checkout without an install
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "OMP_"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", *plugin, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "test_theirs.py"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tiny_checkpoints_are_built_once_per_run(tmp_path, monkeypatch):
    """Bug class: the pytest-xdist workers sharing tiny checkpoints (pytest_plugin.TinyCheckpoints) and one
    of them reading a checkpoint another is still writing, or building each again; and a build that a
    stopped worker left half-done taken as complete. Two instances on one folder stand for two workers."""
    from llama_parity.fixtures import factory
    from llama_parity.pytest_plugin import TinyCheckpoints

    built = []
    real = factory.make_tiny_checkpoint
    monkeypatch.setattr(factory, "make_tiny_checkpoint", lambda *a, **k: built.append(a[1]) or real(*a, **k))
    first, second = TinyCheckpoints(tmp_path), TinyCheckpoints(tmp_path)
    meta, hf = first.meta("llama3.2-1b"), first.hf("llama3.2-1b")
    assert (second.meta("llama3.2-1b"), second.hf("llama3.2-1b")) == (meta, hf)
    assert len(built) == 1 and (hf / "config.json").is_file()
    # a worker stopped while it built: files but no marker; the next one builds it again, whole
    (tmp_path / "llama3.1-8b-mp1").mkdir()
    (tmp_path / "llama3.1-8b-mp1" / "partial").write_text("")
    meta = TinyCheckpoints(tmp_path).meta("llama3.1-8b")
    assert len(built) == 2 and not (tmp_path / "llama3.1-8b-mp1" / "partial").exists()
    assert (meta / "params.json").is_file()

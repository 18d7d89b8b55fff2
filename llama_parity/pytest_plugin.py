"""The parity suite's pytest plugin: options, tiny checkpoints built once per run, devices, real weights.

Registered through the `pytest11` entry point, so an installed llama-parity runs its suite on a
user's checkpoint without a source checkout:

    pytest --pyargs llama_parity.parity_tests --meta-dir /path/to/Llama3.2-1B [--hf-dir /path/to/hf]

Loading it costs nothing in other projects' test runs: torch and the rest are imported lazily.

`pytest parity_tests` runs every check on tiny random checkpoints of every architecture variant.
Pointed at real weights (`--meta-dir DIR [--hf-dir DIR]`), the model checks run on them: only those
by default (the user wants their checkpoint judged, not the ~780 tests about the tool, 7.5 minutes),
everything with `--all-tests`. Such a run writes nothing into the working folder: pytest's cache goes
to a temporary folder (Hypothesis keeps no example database: parity_tests/conftest.py).
"""

from __future__ import annotations

import shutil

from pathlib import Path

import pytest

# verify flags the plugin does not take, and why: --json/--html write report files (pytest reports
# itself); --nproc/--timeout launch and wait for ranks (the plugin judges in its own process, and
# pytest-timeout owns --timeout); --attestation/--gguf are other judges than an HF folder's verify.
NOT_OFFERED = ("--json", "--html", "--nproc", "--timeout", "--attestation", "--gguf")


def pytest_addoption(parser):
    g = parser.getgroup("llama-parity")
    g.addoption("--meta-dir", action="append", default=[],
                help="a real Meta checkpoint folder to run the parity checks on (repeatable)")
    g.addoption("--hf-dir", action="append", default=[],
                help="its HF conversion to judge (same order as --meta-dir); converted by us when omitted")
    g.addoption("--all-tests", action="store_true",
                help="with --meta-dir: also run the suite's tests on tiny checkpoints (by default only the "
                     "tests about the given checkpoint run)")
    # verify's options that change what real weights are judged by, spelled and built as verify's own
    # (cli.add_judging_args, cli.options_from_args); the others: NOT_OFFERED
    from llama_parity.cli import add_judging_args, add_variant_arg

    add_variant_arg(g.addoption)
    add_judging_args(g.addoption)


def _option_problems(metas: list[str], hfs: list[str]) -> list[str]:
    problems = []
    for m in metas:
        d = Path(m)
        if not d.is_dir():
            problems.append(f"--meta-dir {m}: no such folder")
        elif not (d / "params.json").is_file() or not any(d.glob("consolidated.*.pth")):
            from llama_parity.inputs import subfolder_hint

            problems.append(f"--meta-dir {m}: not a Meta checkpoint (needs params.json and consolidated.NN.pth)"
                            + subfolder_hint(d))
    for h in hfs:
        if not (Path(h) / "config.json").is_file():
            problems.append(f"--hf-dir {h}: no config.json there (not a Hugging Face model folder)")
    if len(hfs) > len(metas):
        problems.append(f"{len(hfs)} --hf-dir for {len(metas)} --meta-dir: each --hf-dir pairs with the --meta-dir "
                        "in the same position")
    return problems


def pytest_configure(config):
    """Bad --meta-dir/--hf-dir: one usage error before collection, not one failure per parametrized test."""
    problems = _option_problems(config.getoption("--meta-dir", default=[]) or [],
                                config.getoption("--hf-dir", default=[]) or [])
    if problems:
        raise pytest.UsageError("llama-parity: " + "; ".join(problems))
    if config.getoption("--meta-dir", default=[]):
        _keep_cwd_clean(config)


def _keep_cwd_clean(config) -> None:
    """pytest's cache (.pytest_cache) and Hypothesis' folder would land in the user's working folder:
    send them to a temporary one, removed at the end."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="llama-parity-pytest-")
    config.add_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))
    cache = getattr(config, "cache", None)
    if cache is not None and hasattr(cache, "_cachedir"):
        cache._cachedir = Path(tmp) / "pytest-cache"
    try:  # Hypothesis' .hypothesis/ (its unicode tables, even with no example database)
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    set_hypothesis_home_dir(Path(tmp) / "hypothesis")
    config.add_cleanup(lambda: set_hypothesis_home_dir(None))  # a pytest run inside another ends here


def pytest_collection_modifyitems(config, items):
    """With --meta-dir, the tests about that checkpoint (parametrized with it: `checkpoint` ("real", i)
    or `real_pair` i) run; the rest only with --all-tests. Without, tests about given checkpoints
    (`real_pair` None) are deselected: there is none to judge. A narrower scope than verify's full
    one (--quick, --metadata-only, --no-bf16) leaves the verdict test alone on the checkpoint: the
    per-check model tests would run the checks verify was told not to run."""
    real = bool(config.getoption("--meta-dir", default=[]))
    # only with checkpoints given: VerifyOptions lives beside torch, which other projects' runs never load
    opts = verify_options_of(config) if real else None
    per_check = opts is None or opts.checks == "all" and opts.bf16
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        params = spec.params if spec is not None else {}
        ckpt = params.get("checkpoint")
        about_real = isinstance(ckpt, tuple) and ckpt[0] == "real"
        if params.get("real_pair", 0) is None or (about_real and not per_check):
            drop.append(item)
        elif not real or config.getoption("--all-tests", default=False):
            keep.append(item)
        else:
            (keep if about_real or "real_pair" in params else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def verify_options_of(config):
    """The VerifyOptions `llama-parity verify` builds from the same flags (cli.options_from_args, the
    CLI's own builder): the suite judges real weights with verify's checks, scope, twin and release."""
    from llama_parity.cli import options_from_args

    return options_from_args(config.option, judging_only=True)


@pytest.fixture(scope="session")
def verify_options(request):
    return verify_options_of(request.config)


@pytest.fixture(scope="session")
def real_reports(real_pairs, verify_options):
    """verify()'s report on the i-th given pair with the run's options, judged once per session
    (on real weights a whole verify takes minutes: every test about the pair reads this one)."""
    from llama_parity.verify import verify

    made: dict[int, object] = {}

    def get(i: int):
        if i not in made:
            made[i] = verify(*real_pairs[i], verify_options)
        return made[i]
    return get


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def devices() -> list:
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
            not _cuda_available(), reason="no CUDA device on this machine; the same test runs on GPU machines")),
    ]


class TinyCheckpoints:
    """Lazily builds and converts tiny checkpoints; each (variant, shards) once per run.

    Under pytest-xdist the workers share one folder (beside their own temporary folders): the first
    worker to need a checkpoint builds it under a lock and marks it complete, the others read it (each
    worker built all it used again: 25 of the suite's checkpoints twice, 10-17 s of CPU). Tests copy a
    checkpoint before changing it, as they always had to: another test of the same worker reads it next."""

    def __init__(self, root: Path):
        self.root = root
        self._meta: dict[tuple[str, int | None], Path] = {}
        self._hf: dict[tuple[str, int | None], Path] = {}

    def _once(self, name: str, build) -> None:
        """Run build() unless a worker of this run completed it already (the marker file says so)."""
        from filelock import FileLock  # torch's own dependency

        done = self.root / f"{name}.complete"
        if done.exists():
            return
        with FileLock(str(self.root / f"{name}.lock")):
            if not done.exists():
                build()
                done.touch()

    def meta(self, variant_id: str, num_shards: int | None = None) -> Path:
        from llama_parity import releases as variants
        from llama_parity.fixtures.factory import make_tiny_checkpoint

        key = (variant_id, num_shards)
        if key not in self._meta:
            spec = variants.get(variant_id)
            root = self.root / f"{variant_id}-mp{num_shards or spec.num_shards}"
            folder = root / spec.meta_dir_name

            def build():
                shutil.rmtree(root, ignore_errors=True)  # a worker's half-built folder (it was stopped)
                if make_tiny_checkpoint(spec, root, num_shards=num_shards) != folder:
                    raise RuntimeError(f"tiny checkpoint of {variant_id} not at {folder}")

            self._once(root.name, build)
            self._meta[key] = folder
        return self._meta[key]

    def hf(self, variant_id: str, num_shards: int | None = None) -> Path:
        from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf

        key = (variant_id, num_shards)
        if key not in self._hf:
            meta = self.meta(variant_id, num_shards)
            out = meta.parent / "hf"
            self._once(f"{meta.parent.name}-hf", lambda: convert_meta_to_hf(meta, out, ConvertOptions(
                progress=False, overwrite=True)))
            self._hf[key] = out
        return self._hf[key]


def run_folder(tmp_path_factory) -> Path:
    """This run's temporary folder, shared by its pytest-xdist workers (the parent of each worker's own,
    which pytest removes as it removes theirs): what every worker would otherwise build again."""
    import os

    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    root = run_folder(tmp_path_factory) / "tiny"  # shared by the workers (TinyCheckpoints says why)
    root.mkdir(exist_ok=True)
    return TinyCheckpoints(root)


@pytest.fixture(scope="session")
def real_pairs(request, tmp_path_factory) -> list[tuple[Path, Path]]:
    metas = [Path(p) for p in request.config.getoption("--meta-dir")]
    hfs = [Path(p) for p in request.config.getoption("--hf-dir")]
    pairs = []
    for i, m in enumerate(metas):
        if i < len(hfs):
            pairs.append((m, hfs[i]))
        else:
            from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf

            out = tmp_path_factory.mktemp("real") / m.name
            convert_meta_to_hf(m, out, ConvertOptions())
            pairs.append((m, out))
    return pairs

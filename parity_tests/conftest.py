"""Settings for the parity suite alone (never for other projects that have the plugin installed)."""

import atexit
import os
import shutil
import sys

from pathlib import Path

import pytest

from llama_parity.machine import cpu_budget
from llama_parity.pytest_plugin import devices, run_folder

# torch (OpenMP) otherwise starts a thread per core it sees, and its idle threads spin: on a busy
# machine that quadrupled the suite's CPU time (3 model-parity modules beside other work: 177 s wall,
# 42 s CPU with spinning threads; 50 s wall, 10 s CPU passive). Cap the threads to the cores this
# process may use and let idle ones sleep, before the test modules import torch.
# Under pytest-xdist (pyproject's addopts run the suite on one worker per core, plus one) the cores are split
# between the workers, so that two workers never run four threads on two cores.
# The controller's own default (it runs no tests) is what the workers inherit, so a worker sets its
# share itself; a count the user set stays theirs. (Workers took the controller's whole-machine default
# until Dec 2026: two threads each on two cores.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["_LLAMA_PARITY_OMP_DEFAULT"] = "1"
if os.environ.get("_LLAMA_PARITY_OMP_DEFAULT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_budget() // _WORKERS))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Bytecode compiled once per run. Where PYTHONDONTWRITEBYTECODE is set (this project's CI machines set
# it), every pytest-xdist worker and every child the tests start (CLI runs, torchrun ranks and their
# launchers, llama.cpp's runtime) compiled this package's modules again (0.35-0.45 s of CPU for each
# child that imports verify). So the run keeps bytecode: compiled here, before the workers start, and
# the variable dropped (they inherit the environment). The __pycache__ folders the run created in
# this package's folders are removed when it ends: the setting's outcome, no bytecode left behind,
# stands. (PYTHONPYCACHEPREFIX would keep them out of the tree, but Python then ignores every
# existing __pycache__: torch and transformers were compiled again, 200 s instead of 173 s.)
def _keep_bytecode_for_this_run() -> None:
    import importlib.util

    roots = []
    for pkg in ("llama_parity", "llama_parity.converter", "llama_parity.reference_model",
                "llama_parity.fixtures", "llama_parity.parity_tests"):
        spec = importlib.util.find_spec(pkg)
        roots += [Path(r) for r in (spec.submodule_search_locations or [])] if spec else []
    top = Path(__file__).resolve().parent.parent / "__pycache__"  # a checkout's root conftest.py (rewritten)

    def caches() -> set[Path]:
        return {d for r in roots for d in r.rglob("__pycache__")} | ({top} if top.is_dir() else set())
    before = caches()
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    sys.dont_write_bytecode = False

    def remove_new_caches() -> None:
        for d in caches() - before:
            shutil.rmtree(d, ignore_errors=True)
    atexit.register(remove_new_caches)
    import compileall  # now, once, before the workers start: they and every child load the same files

    for r in roots:
        compileall.compile_dir(r, quiet=2)  # a read-only install: nothing to say


if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTEST_XDIST_WORKER"):
    _keep_bytecode_for_this_run()

# Tests never reach a model hub: everything they load is made locally or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property tests are reproducible by default (the same examples every run, so CI cannot turn red
# by chance); `HYPOTHESIS_PROFILE=explore pytest parity_tests` draws fresh, more numerous examples.
try:
    from hypothesis import settings

    # database=None: no .hypothesis/ folder in the working directory (a user's, under --pyargs).
    settings.register_profile("repro", derandomize=True, deadline=None, print_blob=True, database=None)
    settings.register_profile("explore", deadline=None, max_examples=500, print_blob=True, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))
except ImportError:  # hypothesis is a test extra
    pass


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may use (affinity and cgroup quota, not the host's
    core count), plus one: a worker waiting on a child process, a lock or a signal test's pause leaves
    its core to the extra one (2 workers used 182-184% of 2 cores; 3 workers were faster in each of 4
    alternated full runs on 2 cores: 119.6/135.8/154.5/133.6 s against 135.6/140.5/171.8/135.4 s). At
    most 5: the session fixtures are shared, but every worker imports and collects the suite again.
    One core, or a real checkpoint given (`--meta-dir`: a few big model checks that want every core and
    all the memory in one process): no workers at all (0), the suite runs in this process."""
    if config.getoption("meta_dir", default=None):
        return 0
    n = min(cpu_budget(), 4)
    return n + 1 if n > 1 else 0


def pytest_generate_tests(metafunc):
    # Tests taking `checkpoint` run on every tiny architecture variant, plus any real checkpoint given.
    if "checkpoint" in metafunc.fixturenames:
        from llama_parity.releases import architecture_variants

        params = [pytest.param(("tiny", v.id), id=v.id) for v in architecture_variants()]
        params += [pytest.param(("real", i), id=f"real{i}:{Path(p).name}")
                   for i, p in enumerate(metafunc.config.getoption("--meta-dir"))]
        metafunc.parametrize("checkpoint", params, scope="module")  # group tests by checkpoint
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", devices(), scope="module")



# pytest-xdist (`--dist loadfile`) hands out whole files in collection order, and by default first
# reorders them by test count: the files with few but long tests (two-rank launches, subprocesses)
# came last, and one worker idled while the other finished them (a long tail). The slowest files go
# first instead (longest-processing-time first: the short files at the end fill both workers evenly).
# Measured per file (CPU seconds of the test process and its children, the suite on 2 workers);
# files not listed keep their collection order after these.
_SLOWEST_FIRST = (
    "test_verify_paths.py", "test_gguf.py", "test_model_parity.py", "test_distributed_verify.py",
    "test_chat_format.py", "test_tokenizer_parity.py", "test_fairscale_reference.py", "test_detection_and_config.py",
    "test_tokenizer_files.py", "test_streaming_verify.py", "test_mutations.py", "test_cli_ux.py", "test_streaming.py",
    "test_guard_format.py", "test_reports.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # keep our order (below), not xdist's by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


@pytest.fixture(scope="session")
def tok_cases(tmp_path_factory):
    """Every tiny and real tokenizer case (llama_parity/fixtures/tokenizers.py), built once per run: the
    pytest-xdist workers share one folder (beside their own temporary folders), the first builds it under a
    lock, the others read it (it was built once per worker)."""
    from filelock import FileLock  # torch's own dependency

    from llama_parity.fixtures.tokenizers import tokenizer_cases

    root = run_folder(tmp_path_factory)
    with FileLock(str(root / "tokenizers.lock")):
        return tokenizer_cases(root / "tokenizers")


@pytest.fixture(params=[False, True], ids=["bf16-in-fp32", "bf16-kernels"])
def native_bf16(request, monkeypatch):
    """Both ways a CPU computes the bf16 stream's products (shared_products.NATIVE_BF16): the same
    sums in fp32 (no bf16 units) and torch's bf16 kernels (bf16 units: AVX512-BF16, AMX). Where the
    CPU has no bf16 units the kernels are emulated, slowly but with the same values."""
    from llama_parity import shared_products

    monkeypatch.setattr(shared_products, "NATIVE_BF16", request.param)
    return request.param

"""The judge stands apart from the converter, and the package is one namespace without tricks.

A bug shared by both sides cancels out: if `verify` read a layout, a key table or a template
through the converter's own code, a wrong conversion would be confirmed by the same mistake. So no
module of the judge (every module of `llama_parity/` but the command entries below, and all of
`reference_model/`) may import `llama_parity.converter`, directly or through any module it
imports (neutral modules such as `llama_parity.inputs`, `llama_parity.errors` or the registry in
`fixtures/` included). Checked twice: statically over the import statements of the source (function
level imports too), and by a real `llama-parity verify` run that must end with no converter module
loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Modules of llama_parity/ that are not the judge: they run the converter on purpose.
ENTRY_POINTS = {"llama_parity.__main__", "llama_parity.cli", "llama_parity.demo", "llama_parity.pytest_plugin"}
CONVERTER = "llama_parity.converter"

# Edges from the judge into the converter not yet removed (judge module -> converter module), each
# to be deleted with the edge: the test fails on any edge not listed here AND on a listed edge that
# no longer exists, so this list can only shrink.
KNOWN_EDGES: set[tuple[str, str]] = set()
# What a `verify` run may load of the converter while KNOWN_EDGES is not empty (same rule: shrinks).
KNOWN_LOADED: set[str] = set()


def _modules() -> dict[str, Path]:
    """Every module of the installed package (checkout or wheel alike): name -> source file, found
    through the import system's own mapping of each sub-package."""
    out = {}
    for pkg in ("llama_parity", "llama_parity.converter", "llama_parity.reference_model", "llama_parity.fixtures"):
        spec = importlib.util.find_spec(pkg)
        for root in spec.submodule_search_locations:
            for f in Path(root).rglob("*.py"):
                rel = f.relative_to(root).with_suffix("").parts
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                if all(p.isidentifier() for p in rel):  # (a wheel holds the sub-packages inside llama_parity/)
                    out.setdefault(".".join((pkg, *rel)), f)
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its source (relative imports resolved; for
    `from X import Y`, X.Y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` imports a and a.b too
            parts = t.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found - {name}


def _is_judge(name: str) -> bool:
    return (name.startswith("llama_parity.reference_model") or
            (name.count(".") >= 1 and name.split(".")[1] not in ("converter", "fixtures", "parity_tests")
             and name not in ENTRY_POINTS))


def judge_edges_into_converter() -> dict[tuple[str, str], list[str]]:
    """(judge module, converter module) -> the import chain, for every path from the judge into the
    converter; neutral modules on the way are followed, the converter's own imports are not, nor the
    command entries' (the CLI imports the converter inside its convert commands; what a verify run
    loads of it is the dynamic test's question)."""
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    edges = {}
    for start in sorted(n for n in mods if _is_judge(n)):
        seen, todo = {start}, [[start]]
        while todo:
            chain = todo.pop()
            targets = graph[chain[-1]]
            for nxt in sorted(targets):
                if nxt.startswith(CONVERTER):
                    if not any(t.startswith(nxt + ".") for t in targets):  # the module named, not its parents
                        edges.setdefault((chain[-1], nxt), chain + [nxt])
                elif nxt not in seen and nxt not in ENTRY_POINTS:
                    seen.add(nxt)
                    todo.append(chain + [nxt])
    return edges


def test_judge_imports_no_converter_module():
    """Bug class: the judge reading a layout, key table, template or input check through the
    converter's code (`verify` importing converter.input_checks, say), so that a bug in it is shared
    by both sides and cancels out. Static: every import statement of every judge module and of the
    neutral modules they reach; an edge into `llama_parity.converter` fails unless it is one of the
    KNOWN_EDGES still being removed, and a KNOWN_EDGES entry that no longer exists fails too."""
    edges = judge_edges_into_converter()
    new = {e: " -> ".join(chain) for e, chain in edges.items() if e not in KNOWN_EDGES}
    assert not new, "the judge imports the converter: " + "; ".join(new.values())
    gone = KNOWN_EDGES - set(edges)
    assert not gone, f"edges removed: delete them from KNOWN_EDGES so they cannot come back: {sorted(gone)}"


def test_the_graph_walk_sees_edges():
    """Bug class: an import-graph walk that finds nothing (a wrong module mapping, relative imports
    not resolved, function-level imports skipped) and so passes whatever the judge imports. The
    converter's own modules import each other, and the CLI (an entry point, not the judge) imports
    the converter inside its command functions: both must be seen."""
    mods = _modules()
    assert {"llama_parity.verify", "llama_parity.converter.convert", "llama_parity.reference_model.model",
            "llama_parity.releases.registry"} <= set(mods)
    assert "llama_parity.converter.keymap" in _imports("llama_parity.converter.input_checks",
                                                         mods["llama_parity.converter.input_checks"], set(mods))
    assert "llama_parity.converter.convert" in _imports("llama_parity.cli", mods["llama_parity.cli"], set(mods))
    assert "llama_parity.parity" in _imports("llama_parity.verify", mods["llama_parity.verify"], set(mods))
    assert not _is_judge("llama_parity.cli") and _is_judge("llama_parity.verify")
    assert _is_judge("llama_parity.reference_model.model") and not _is_judge("llama_parity.converter.keymap")


# One fresh process outside the checkout (as a user's, from the wheel or the editable install) for the
# tests below: first a verify refused by its identification, then a real `llama-parity verify`, whose
# loaded modules are listed before anything else is imported, then every module of the package imported.
# One interpreter with torch and transformers loaded once instead of several (each start cost seconds of
# CPU); each test reads its own part of the answer.
_FRESH_PROCESS = """
import importlib, json, pkgutil, sys, threading
from llama_parity import verify as v
from llama_parity.cli import main
from llama_parity.errors import InputError
from llama_parity.releases import IdentifyError
identify = v.identify_checkpoint
def ambiguous(*a, **k):  # as when the files fit two releases and nothing picks one
    raise IdentifyError("fits llama-a and llama-b")
v.identify_checkpoint = ambiguous
try:  # refused while verify's thread imports transformers; then the real run imports it (StreamingHF)
    v.verify(*sys.argv[3:6:2], tokenizer=False, checks="quick")
    refused = ""
except InputError as e:
    refused = str(e)
v.identify_checkpoint = identify
left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
code = main(sys.argv[1:])
verify = {"code": code, "modules": sorted(m for m in sys.modules if m.startswith("llama_parity.")),
          "refused": refused, "threads": left}
import llama_parity
stray = {}
for name in ("llama_parity.llama_parity", "llama_parity.llama_parity.cli", "llama_parity.benchmarks",
             "llama_parity.conftest"):
    try:
        importlib.import_module(name)
        stray[name] = "imports"
    except ImportError:
        pass
subs = {n: importlib.import_module("llama_parity." + n).__file__
        for n in ("converter", "reference_model", "fixtures", "parity_tests")}
for pkg in [llama_parity] + [sys.modules["llama_parity." + n] for n in subs]:  # (a checkout maps them elsewhere)
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
by_file = {}
for name, mod in list(sys.modules.items()):
    if getattr(mod, "__file__", None) and (name == "llama_parity" or name.startswith("llama_parity.")):
        by_file.setdefault(mod.__file__, []).append(name)
print(json.dumps({"verify": verify, "namespace": {"stray": stray, "subs": subs,
                                                  "twice": [v for v in by_file.values() if len(v) > 1]}}))
"""


@pytest.fixture(scope="module")
def fresh_process(tiny, tmp_path_factory) -> dict:
    meta, hf = tiny.meta("llama3.2-1b"), tiny.hf("llama3.2-1b")
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, "verify", "--meta-dir", str(meta), "--hf-dir", str(hf),
                        "--quick"], capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("away"))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_verify_run_loads_no_converter_module(fresh_process):
    """Bug class: a `verify` run that loads converter code at run time (a lazy import inside a
    function, the CLI's module-level imports, a neutral module importing the converter): the static
    walk could miss an import made by name. A real `llama-parity verify` of a tiny conversion, in a
    fresh process, must pass and end with no `llama_parity.converter` module in sys.modules (beyond
    KNOWN_LOADED while KNOWN_EDGES is not empty)."""
    code, loaded = fresh_process["verify"]["code"], set(fresh_process["verify"]["modules"])
    assert code == 0
    assert "llama_parity.verify" in loaded and "llama_parity.reference_model.model" in loaded
    converter = {m for m in loaded if m == CONVERTER or m.startswith(CONVERTER + ".")}
    allowed = KNOWN_LOADED if KNOWN_EDGES else set()
    assert converter <= allowed, f"verify loaded converter modules: {sorted(converter - allowed)}"
    assert not allowed - converter, f"no longer loaded by verify: remove from KNOWN_LOADED: {sorted(allowed - converter)}"


def test_refused_verify_leaves_transformers_importable(fresh_process):
    """Bug class: verify importing transformers in a thread (to overlap the import with the metadata
    checks) and returning, here refusing its inputs, with that import still running: the caller's
    own `from transformers import ...` (in the fresh process: the next verify's StreamingHF) then
    waits for it and gets the half-built module object ("cannot import name 'AutoConfig'"), or the
    thread is left running into the caller's forks."""
    got = fresh_process["verify"]
    assert got["refused"] == "fits llama-a and llama-b", got["refused"]
    assert "llama-parity-import" not in got["threads"], got["threads"]
    assert got["code"] == 0


def test_one_namespace_without_the_checkout_root(fresh_process):
    """Bug class: the package reaching the checkout through a splice of its root into
    `llama_parity.__path__`, so that any folder there imports (`llama_parity.llama_parity.cli` as a
    second module object of the CLI, `llama_parity.benchmarks`, `llama_parity.conftest`) and module
    state exists twice. In a fresh process outside the checkout (as a user's, from the wheel or the
    editable install): exactly the four mapped folders import under `llama_parity`, nothing else of
    the checkout does, and importing every module of the package loads each file once."""
    out = fresh_process["namespace"]
    assert not out["stray"], f"not part of the package, yet importable: {out['stray']}"
    assert not out["twice"], f"one file loaded as several modules: {out['twice']}"
    folders = {n: Path(f).parent.name for n, f in out["subs"].items()}
    assert folders == {n: n for n in folders}, folders


def test_no_module_imports_a_checkout_folder_by_its_top_level_name():
    """Bug class: `import converter` (or fixtures, reference_model, parity_tests) instead of
    `llama_parity.converter`: it works from a checkout, whose root is on sys.path, as a second copy
    of the module with its own state, and fails from the wheel, which claims no such names."""
    mods = _modules()
    top = {"converter", "fixtures", "reference_model", "parity_tests"}
    spec = importlib.util.find_spec("llama_parity.parity_tests")
    tests = {f"llama_parity.parity_tests.{f.stem}": f for r in spec.submodule_search_locations
             for f in Path(r).glob("*.py")}
    bad = []
    for name, path in {**mods, **tests}.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{name}: {n}" for n in names if n.split(".")[0] in top]
    assert not bad, bad


_CLI_IMPORT_PROBE = """
import os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
import llama_parity.cli as cli
imported = ("OMP_WAIT_POLICY" in os.environ, "torch" in sys.modules)
try:
    cli.main(["--version"])
except SystemExit:
    pass
print(imported, os.environ.get("OMP_WAIT_POLICY"))
"""


def test_importing_the_cli_changes_no_process_state():
    """Bug class: process-wide state set as a side effect of an import (an environment variable set
    when `llama_parity.cli` is imported, by a test or a library user, whether or not a command
    runs), or set too late to matter: `main` must set OMP_WAIT_POLICY itself, before torch loads."""
    r = subprocess.run([sys.executable, "-c", _CLI_IMPORT_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "(False, False) PASSIVE", r.stdout

"""Shared fixtures: tiny checkpoints built once per test run, devices, and real-weights options.

`pytest parity_tests` runs every check on tiny random checkpoints of every architecture variant.
Pointed at real weights (`--meta-dir DIR [--hf-dir DIR]`), the same model checks run on them too:
the real pair is added to the parametrization, nothing is skipped in its absence.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub: everything they load is made locally or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property tests are reproducible by default (the same examples every run, so CI cannot turn red
# by chance); `HYPOTHESIS_PROFILE=explore pytest parity_tests` draws fresh, more numerous examples.
try:
    from hypothesis import settings

    settings.register_profile("repro", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("explore", deadline=None, max_examples=500, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))
except ImportError:  # hypothesis is a test extra
    pass


def pytest_addoption(parser):
    g = parser.getgroup("llama-parity")
    g.addoption("--meta-dir", action="append", default=[],
                help="a real Meta checkpoint folder to run the parity checks on (repeatable)")
    g.addoption("--hf-dir", action="append", default=[],
                help="its HF conversion to judge (same order as --meta-dir); converted by us when omitted")


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device on this machine; the same test runs on GPU machines")),
]


class TinyCheckpoints:
    """Lazily builds and converts tiny checkpoints; each (variant, shards) once per session."""

    def __init__(self, root: Path):
        self.root = root
        self._meta: dict[tuple[str, int | None], Path] = {}
        self._hf: dict[tuple[str, int | None], Path] = {}

    def meta(self, variant_id: str, num_shards: int | None = None) -> Path:
        from fixtures import variants
        from fixtures.factory import make_tiny_checkpoint

        key = (variant_id, num_shards)
        if key not in self._meta:
            spec = variants.get(variant_id)
            self._meta[key] = make_tiny_checkpoint(spec, self.root / f"{variant_id}-mp{num_shards or spec.num_shards}",
                                                   num_shards=num_shards)
        return self._meta[key]

    def hf(self, variant_id: str, num_shards: int | None = None) -> Path:
        from converter.convert import ConvertOptions, convert_meta_to_hf

        key = (variant_id, num_shards)
        if key not in self._hf:
            meta = self.meta(variant_id, num_shards)
            out = meta.parent / "hf"
            convert_meta_to_hf(meta, out, ConvertOptions(progress=False))
            self._hf[key] = out
        return self._hf[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def real_pairs(request, tmp_path_factory) -> list[tuple[Path, Path]]:
    metas = [Path(p) for p in request.config.getoption("--meta-dir")]
    hfs = [Path(p) for p in request.config.getoption("--hf-dir")]
    pairs = []
    for i, m in enumerate(metas):
        if i < len(hfs):
            pairs.append((m, hfs[i]))
        else:
            from converter.convert import ConvertOptions, convert_meta_to_hf

            out = tmp_path_factory.mktemp("real") / m.name
            convert_meta_to_hf(m, out, ConvertOptions())
            pairs.append((m, out))
    return pairs


def pytest_generate_tests(metafunc):
    # Tests taking `checkpoint` run on every tiny architecture variant, plus any real checkpoint given.
    if "checkpoint" in metafunc.fixturenames:
        from fixtures.variants import architecture_variants

        params = [pytest.param(("tiny", v.id), id=v.id) for v in architecture_variants()]
        params += [pytest.param(("real", i), id=f"real{i}:{Path(p).name}")
                   for i, p in enumerate(metafunc.config.getoption("--meta-dir"))]
        metafunc.parametrize("checkpoint", params, scope="module")  # group tests by checkpoint
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, scope="module")

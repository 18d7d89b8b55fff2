"""`verify --hf-dir REPO` with no --meta-dir: an official-style repository (or its Hugging Face cache
snapshot, files symlinked to blobs) judged against the Meta files in its own original/ folder."""

from __future__ import annotations

import os
import shutil

import pytest

from llama_parity.cli import main

VARIANT = "llama3.2-1b"


@pytest.fixture(scope="module")
def repo(tiny, tmp_path_factory):
    """Our conversion with --keep-original: config, weights and tokenizer, Meta's files in original/."""
    from llama_parity.converter.convert import ConvertOptions, convert_meta_to_hf

    out = tmp_path_factory.mktemp("official") / "Llama-3.2-1B"
    convert_meta_to_hf(tiny.meta(VARIANT), out, ConvertOptions(keep_original=True))
    return out


def _snapshot(repo, root):
    """The repository as huggingface_hub caches it: snapshots/<rev>/ of symlinks into blobs/."""
    blobs, snap = root / "blobs", root / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    for i, p in enumerate(sorted(q for q in repo.rglob("*") if q.is_file())):
        rel = p.relative_to(repo)
        shutil.copy(p, blobs / f"blob{i}")
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / f"blob{i}", (snap / rel).parent), snap / rel)
    return snap


def test_repo_judged_against_its_original(repo, tmp_path):
    """Bug class: an official-style repository (or a cache snapshot of one) that cannot be judged without
    re-downloading Meta's files elsewhere, or whose original/ is silently ignored."""
    assert main(["verify", "--hf-dir", str(repo), "--variant", VARIANT, "--quick"]) == 0
    snap = _snapshot(repo, tmp_path / "models--meta-llama--Llama-3.2-1B")
    assert (snap / "original" / "params.json").is_symlink()
    assert main(["verify", "--hf-dir", str(snap), "--variant", VARIANT, "--quick"]) == 0


def test_repo_without_original_needs_meta_dir(tiny, capsys):
    """Bug class: verify with neither --meta-dir nor an original/ folder crashing instead of saying what it needs."""
    assert main(["verify", "--hf-dir", str(tiny.hf(VARIANT))]) == 2
    assert "original/" in capsys.readouterr().err

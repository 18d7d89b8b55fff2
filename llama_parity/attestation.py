"""Attestation: what a verify proved, as digests a copy of the HF folder can be checked against.

`verify` reads every byte of both folders (exact_bytes.py) and records, in its JSON report:
sha256 of every HF file (the weight files' digests are what the Hugging Face Hub shows as each
LFS file's sha256) and of every HF tensor's stored bytes, sha256 of the Meta files it was judged
against, the release and its base/instruct twin whose metadata was expected, the verdict, and
each check's measured value against its bound (the margins).

`llama-parity verify --attestation REPORT.json --hf-dir DIR` re-checks a folder against such a
report in one read of its files (no Meta checkpoint, no model): after an upload, a download or a
copy, it names each file and tensor that changed, went missing or was added. The weight files are
hashed whole first (one sha256 pass, at read speed); only a weight file whose digest changed is
read again, tensor by tensor, to name its changed tensors (a file unchanged byte for byte holds
the tensors attested).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = 1


class AttestationError(Exception):
    """The report cannot be used (missing, not JSON, no attestation): bad input, exit 2."""


def build(res, meta) -> dict:
    """The attestation of one verify (exact_bytes.BytesResult, metadata.MetaSide); margins and the
    verdict are added when the report is written (with_margins), after every check has run."""
    from .metadata import metadata_release

    twin = metadata_release(meta)
    return {"format": FORMAT, "hf_files": dict(sorted(res.hf_files.items())),
            "hf_tensors": dict(sorted(res.hf_tensors.items())), "meta_files": dict(sorted(res.meta_files.items())),
            "release": meta.release.id if meta.release else None,
            "twin": {"id": twin.id, "instruct": meta.instruct},
            "digest": summary_digest(res.hf_files)}


def summary_digest(files: dict[str, str]) -> str:
    """One sha256 standing for every attested file (name and digest): what the model card shows."""
    return hashlib.sha256("".join(f"{n}\t{d}\n" for n, d in sorted(files.items())).encode()).hexdigest()


def with_margins(att: dict, report) -> dict:
    margins = {c.name: {"measured": c.measured, "bound": c.bound, "ok": c.ok} for c in report.checks
               if isinstance(c.measured, (int, float)) and isinstance(c.bound, (int, float))}
    return {**att, "verdict": report.verdict, "scope": report.scope, "margins": margins}


@dataclass
class Recheck:
    report: str
    hf_dir: str
    files: int = 0
    tensors: int = 0
    changed_files: list[str] = field(default_factory=list)
    changed_tensors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    verdict: str = ""  # the attested report's own verdict
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def same(self) -> bool:
        return not (self.changed_files or self.changed_tensors or self.missing or self.added)

    @property
    def ok(self) -> bool:
        return self.same and self.verdict.startswith(("PARITY OK", "METADATA OK"))

    def render(self) -> str:
        lines = [f"attestation {self.report}: {self.files} files, {self.tensors} tensors; read "
                 f"{self.bytes_read / 1e9:.2f} GB in {self.seconds:.1f} s"]
        for what, items in (("changed file", self.changed_files), ("changed tensor", self.changed_tensors),
                            ("missing", self.missing), ("not attested (added)", self.added)):
            lines += [f"  FAIL {what}: {x}" for x in items[:20]] + ([f"  ... +{len(items) - 20} more"]
                                                                    if len(items) > 20 else [])
        if self.same:
            lines.append(f"  every file and tensor is the one attested; the attested verify said: {self.verdict}")
        if self.same and not self.ok:
            lines.append("ATTESTATION MATCHES A FAILED VERIFY")
        else:
            lines.append("ATTESTATION OK" if self.ok else "ATTESTATION FAILED")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "same": self.same, "report": self.report, "hf_dir": self.hf_dir,
                "changed_files": self.changed_files, "changed_tensors": self.changed_tensors,
                "missing": self.missing, "added": self.added, "attested_verdict": self.verdict}


def load(report: Path) -> dict:
    try:
        data = json.loads(Path(report).read_text())
    except OSError as e:
        raise AttestationError(f"cannot read {report}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttestationError(f"{report} is not JSON ({e})") from None
    att = data.get("attestation") if isinstance(data, dict) else None
    if not isinstance(att, dict) or att.get("format") != FORMAT or not all(
            isinstance(att.get(k), dict) and all(isinstance(v, str) for v in att[k].values())
            for k in ("hf_files", "hf_tensors")):
        raise AttestationError(f"{report} is not a verify --json report with an attestation (format {FORMAT}); "
                               "write one with `llama-parity verify ... --json REPORT.json`")
    return att


def recheck(report: Path, hf_dir: Path) -> Recheck:
    """Hash the folder's files (one read) and compare; a changed weight file is read again, tensor by tensor."""
    from .exact_bytes import BytesResult, _attested_files, _hf_pass, file_sha256
    from .formats.safetensors import read_header

    att = load(report)
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise AttestationError(f"HF model directory {hf_dir} does not exist")
    t0 = time.perf_counter()
    present = {p.name: p for p in _attested_files(hf_dir)}
    res = BytesResult()
    weights = sorted(n for n in present if n.endswith(".safetensors") and n in att["hf_files"])
    _hf_pass(hf_dir, weights, res, tensors=False)
    changed = [n for n in weights if res.hf_files[n] != att["hf_files"][n]]
    seen = {t: att["hf_tensors"][t] for n in weights if n not in changed for t in read_header(hf_dir / n).tensors
            if t in att["hf_tensors"]}  # the same bytes as attested: the same tensors
    if changed:
        again = BytesResult()
        _hf_pass(hf_dir, changed, again, screen=False)  # NaN/inf were judged by the verify attested
        seen.update(again.hf_tensors)
        res.bytes_read += again.bytes_read
    for name, p in present.items():
        if name not in res.hf_files and name in att["hf_files"]:
            res.hf_files[name] = file_sha256(p)
            res.bytes_read += p.stat().st_size
    out = Recheck(str(report), str(hf_dir), len(att["hf_files"]), len(att["hf_tensors"]),
                  verdict=str(att.get("verdict", "")), bytes_read=res.bytes_read)
    out.changed_files = sorted(n for n, d in res.hf_files.items() if d != att["hf_files"][n])
    out.missing = sorted(set(att["hf_files"]) - set(present))
    out.added = sorted(set(present) - set(att["hf_files"]))
    # A tensor counts as changed when its file changed and its own bytes differ (or it is gone):
    # the file digest alone says "this file", the tensor digests say which weight.
    for name, digest in att["hf_tensors"].items():
        if name in seen and seen[name] != digest:
            out.changed_tensors.append(name)
        elif name not in seen and not out.missing and weights:
            out.changed_tensors.append(f"{name} (no longer in any attested weight file)")
    out.changed_tensors += [f"{n} (not attested)" for n in seen if n not in att["hf_tensors"]]
    out.changed_tensors.sort()
    out.seconds = time.perf_counter() - t0
    return out

"""`verify --meta-dir M --hf-dir A --hf-dir B --gguf F1 --gguf F2`: several outputs of one checkpoint judged
in one run, one report with a section per output and one exit code (1 if any output fails).

Each output gets exactly the report a single-output verify gives it (the same checks and bounds); the
GGUF sections share the tokenizer proof when their tokenizer keys are byte-identical (gguf_judge memo).
The JSON is {"ok", "verdict", "meta_dir", "outputs": [{"kind", "path", "report": <single report>}]};
a run with one output keeps the single-output JSON shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OutputReport:
    kind: str  # "hf" or "gguf"
    path: str
    report: object  # verify.VerifyReport


@dataclass
class MultiReport:
    meta_dir: str
    outputs: list[OutputReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.report.ok for o in self.outputs)

    @property
    def verdict(self) -> str:
        failed = [o for o in self.outputs if not o.report.ok]
        if not failed:
            return f"ALL {len(self.outputs)} OUTPUTS OK"
        return f"PARITY FAILED: {len(failed)} of {len(self.outputs)} outputs (" + ", ".join(
            Path(o.path).name for o in failed) + ")"

    def render(self) -> str:
        parts = []
        for i, o in enumerate(self.outputs, start=1):
            what = "GGUF file" if o.kind == "gguf" else "HF folder"
            parts.append(f"=== output {i}/{len(self.outputs)}: {what} {o.path} ===\n{o.report.render()}")
        return "\n\n".join(parts) + f"\n\n{self.verdict}"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "verdict": self.verdict, "meta_dir": self.meta_dir,
                "outputs": [{"kind": o.kind, "path": o.path, "ok": o.report.ok, "report": o.report.to_dict()}
                            for o in self.outputs]}


def refusal(args) -> str | None:
    """Options that name one output only, given with several (one error line, exit 2)."""
    for flag, given in (("--html", args.html), ("--attestation", args.attestation), ("--nproc", args.nproc)):
        if given:
            return (f"{flag} judges one output: run verify once per output for it, or drop {flag} "
                    f"(several --hf-dir/--gguf give one text and --json report)")
    return None


def verify_many(meta_dir, hf_dirs: list[str], ggufs: list[str], opts, *, verify_hf=None, verify_gguf=None
                ) -> MultiReport:
    """Every output against the one Meta checkpoint, in the order HF folders then GGUF files. Bad input in
    any output raises verify.InputError (nothing judged is reported half)."""
    from .verify import InputError, verify

    verify_hf = verify_hf or verify
    if verify_gguf is None:
        from .gguf_judge import verify_gguf
    seen = set()
    for p in [*hf_dirs, *ggufs]:
        if str(Path(p).resolve()) in seen:
            raise InputError(f"{p} is given twice: name each output once")
        seen.add(str(Path(p).resolve()))
    multi = MultiReport(str(meta_dir))
    for hf in hf_dirs:
        multi.outputs.append(OutputReport("hf", str(hf), verify_hf(meta_dir, hf, opts)))
    for f in ggufs:
        rep = verify_gguf(meta_dir, f, variant_id=opts.variant_id, instruct=opts.instruct, checks=opts.checks)
        multi.outputs.append(OutputReport("gguf", str(f), rep))
    return multi

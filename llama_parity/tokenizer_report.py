"""The tokenizer report and what every check step shares (tokenizer_check and its step modules).

`TokenizerReport` holds named `CheckResult`s; a check with a bound is exact, one without is a measured
class (reported with counts, never a failure). `Ctx` is what the steps read: Meta's tokenizer, the HF
tokenizer as users load it, and the HF folder's raw JSON files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_EXAMPLES = 5  # mismatches kept per check in the report (counts are always complete)


# --- the report --------------------------------------------------------------------------------------------

@dataclass
class Mismatch:
    text: str
    meta: Any
    hf: Any
    first_diff: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    name: str
    total: int
    mismatches: int
    bound: int | None  # None: measured and reported, not a failure
    examples: list[Mismatch] = field(default_factory=list)
    note: str = ""
    accepted: list[str] = field(default_factory=list)  # differences that change nothing, each saying why

    @property
    def ok(self) -> bool:
        return self.bound is None or self.mismatches <= self.bound

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class TokenizerReport:
    tokenizer_model: str
    hf_dir: str
    kind: str
    checks: list[CheckResult]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer_model": self.tokenizer_model, "hf_dir": self.hf_dir, "kind": self.kind, "ok": self.ok,
                "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes)}

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, measured, bound, ok) for a human table. Measured classes read as measurements."""
        out = []
        for c in self.checks:
            if c.bound is None:
                out.append((f"tokenizer: {c.name}", f"{c.mismatches}/{c.total} differ",
                            "measured (docs/tokenizers.md)", c.ok))
            else:
                out.append((f"tokenizer: {c.name}", f"{c.mismatches}/{c.total} mismatches", f"<= {c.bound}", c.ok))
        return out

    def mismatch_lines(self) -> list[str]:
        """Examples of each mismatch, failing checks first (measured classes after them)."""
        lines = []
        for c in sorted(self.checks, key=lambda c: c.ok):
            for m in c.examples:
                lines.append(f"[{c.name}] {m.text!r}: meta={m.meta!r} hf={m.hf!r} first diff at {m.first_diff}")
        return lines


def first_diff(a, b) -> int:
    """First differing position (-1 when equal); 0 for differing scalars."""
    if not (isinstance(a, (str, list, tuple)) and isinstance(b, (str, list, tuple))):
        return -1 if a == b else 0
    if isinstance(a, str) and isinstance(b, str):
        n = min(len(a), len(b))
    else:
        a, b = list(a), list(b)
        n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n if len(a) != len(b) else -1


class Acc:
    """Counts one check's comparisons and keeps its first mismatches as examples."""

    def __init__(self, name: str, bound: int | None, note: str = ""):
        self.r = CheckResult(name, 0, 0, bound, note=note)

    def accept(self, text: str) -> None:
        """A difference that passes (it changes no encoding, decoding or truncation): counted and said."""
        self.r.total += 1
        self.r.accepted.append(text)

    def add(self, text: Any, meta: Any, hf: Any) -> None:
        self.r.total += 1
        if meta != hf:
            self.r.mismatches += 1
            if len(self.r.examples) < MAX_EXAMPLES:
                shown = text if isinstance(text, str) and len(text) <= 200 else short(text)
                fd = first_diff(meta, hf)
                if isinstance(meta, str) and isinstance(hf, str) and max(len(meta), len(hf)) > 200:
                    meta, hf = _around(meta, fd), _around(hf, fd)  # long renderings: where they part
                self.r.examples.append(Mismatch(shown, short(meta), short(hf), fd))


def _around(s: str, i: int, width: int = 60) -> str:
    return ("..." if i > width else "") + s[max(0, i - width) : i + width] + ("..." if i + width < len(s) else "")


def short(x: Any) -> Any:
    if isinstance(x, str) and len(x) > 200:
        return x[:100] + f"...<{len(x)} chars>..." + x[-20:]
    if isinstance(x, list) and len(x) > 60:
        return x[:30] + ["..."] + x[-10:]
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
        return json.dumps(x, ensure_ascii=False)
    return x


# --- what every step shares --------------------------------------------------------------------------------

@dataclass
class Ctx:
    """Everything the check steps share: Meta's tokenizer, the loaded HF tokenizer and the raw HF files."""

    tokenizer_model: Path
    hf_dir: Path
    meta: Any
    hf: Any
    sp: bool
    release: Any  # tokenizer_check.TokenizerRelease | None
    tokenizer_json: dict | None
    tokenizer_config: dict | None
    special_map: dict | None


def hf_call(fn):
    """Run one HF call; an exception becomes a value that differs from Meta's (reported, not raised)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of the judged tokenizer is a mismatch
        return f"error: {type(e).__name__}: {e}"


def is_reserved_name(name: str) -> bool:
    return name.startswith("<|reserved_special_token_") or name in ("<|step_id|>", "<|image|>")


def ids_of(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None

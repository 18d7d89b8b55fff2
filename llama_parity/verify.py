"""`llama-parity verify`: judge any HF directory against the Meta checkpoint it claims to be.

It trusts nothing the converter decided: the reference runs on the Meta files (shards unmerged),
transformers runs on the HF files, and the expected config values are derived from params.json
and the registry's facts. Output from any converter (ours, transformers' script) can be judged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from llama_parity.releases import IdentifyError, find_tokenizer, fp8_refusal

from .errors import InputError
from .inputs import check_hf_files, load_shard_safely, read_json, subfolder_hint
from .machine import available_memory
from .metadata import hf_key, hf_weights_dtype, identify_checkpoint, metadata_checks, structure_ok
from .parity import Check, expected_rope_scaling, run_model_checks




@dataclass
class VerifyReport:
    meta_dir: str
    hf_dir: str
    device: str
    checks: list[Check] = field(default_factory=list)
    tokenizer: object | None = None  # llama_parity.tokenizer_check.TokenizerReport
    notes: list[str] = field(default_factory=list)
    scope: str = "all"  # what was asked: "all", "quick" or "metadata" (no model run)
    models_run: bool = True  # verify() says False until its model checks have run
    attestation: dict | None = None  # attestation.build: digests of both folders

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and (self.tokenizer is None or self.tokenizer.ok)

    @property
    def verdict(self) -> str:
        """PARITY OK only when the models ran and every check passed; a metadata-only run says so."""
        if self.models_run:
            return "PARITY OK" if self.ok else "PARITY FAILED"
        return "METADATA OK (models not run)" if self.ok else "PARITY FAILED (models not run)"

    def rows(self) -> list[tuple[str, str, str, bool]]:
        rows = [(c.name, format_value(c.measured), format_value(c.bound), c.ok) for c in self.checks]
        if self.tokenizer is not None:
            rows += list(self.tokenizer.rows())
        return rows

    def to_dict(self) -> dict:
        from .attestation import with_margins

        return {
            "ok": self.ok, "verdict": self.verdict, "scope": self.scope, "models_run": self.models_run,
            "meta_dir": self.meta_dir, "hf_dir": self.hf_dir, "device": self.device,
            "checks": [c.to_dict() for c in self.checks],
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer is not None else None,
            "notes": self.notes,
            "attestation": with_margins(self.attestation, self) if self.attestation is not None else None,
        }

    def render(self) -> str:
        # Rows without a bound are measurements (documented differences), not passes: say so.
        rows = [(n, f"{m} (known)" if m.endswith(" differ") else m, "-", None) if str(b).startswith("measured")
                else (n, m, b, ok) for n, m, b, ok in self.rows()]
        w0 = max(len(r[0]) for r in rows) if rows else 10
        w1 = max(len(r[1]) for r in rows) if rows else 10
        w2 = max(len(r[2]) for r in rows) if rows else 10
        lines = [f"{'check':<{w0}}  {'measured':>{w1}}  {'bound':>{w2}}  result",
                 f"{'-' * w0}  {'-' * w1}  {'-' * w2}  ------"]
        for name, measured, bound, ok in rows:
            result = "measured, not judged" if ok is None else "ok" if ok else "FAIL"
            lines.append(f"{name:<{w0}}  {measured:>{w1}}  {bound:>{w2}}  {result}")
        if any(ok is None for *_, ok in rows):
            lines.append("  measured: counted and reported, not judged (known differences; why: docs/tokenizers.md, "
                         "\"What is exact and what is measured\")")
        for c in self.checks:
            if not c.ok:
                lines.append(f"  FAIL {c.name}: {c.detail}  (catches: {c.catches})")
        if self.tokenizer is not None and not self.tokenizer.ok:
            lines += ["  " + m for m in self.tokenizer.mismatch_lines()[:20]]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(self.verdict)
        return "\n".join(lines)


def format_value(x) -> str:
    """A measured value or bound as the table and the HTML report print it."""
    if isinstance(x, float):
        return "0" if x == 0 else f"{x:.2e}"
    return str(x)


def check_dirs(meta_dir: Path, hf_dir: Path, device: str) -> None:
    """InputError (exit 2) unless both folders are there and readable: never a parity failure."""
    for d, what in ((meta_dir, "Meta checkpoint"), (hf_dir, "HF model")):
        if not d.is_dir():
            raise InputError(f"{what} directory {d} does not exist")
    if not (meta_dir / "params.json").is_file() or not list(meta_dir.glob("consolidated.*.pth")):
        raise InputError(f"{meta_dir} is not a Meta checkpoint (needs params.json and consolidated.NN.pth)"
                         + subfolder_hint(meta_dir))
    if fp8_refusal(meta_dir, None):  # the reference would read scaled FP8 weights as plain numbers
        raise InputError(fp8_refusal(meta_dir, None))
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"config.json missing in {hf_dir}: not a Hugging Face model directory")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but torch sees no CUDA device")
    check_meta_files(meta_dir)
    check_hf_files(hf_dir)
    _refuse_absurd_inputs(meta_dir, hf_dir)


_HARMLESS_META = ("rope.freqs",)  # Llama 1/2's precomputed RoPE buffer: the reference recomputes it


def check_meta_files(meta_dir: Path) -> None:
    """params.json parses and names a model; shards consolidated.00.. to NN load without running
    code; every tensor is one the judge's own key table (metadata.hf_key) has a place for, in a layer
    params.json has. The converter's table (converter/keymap.py) is not asked: the judge stands apart."""
    params = read_json(meta_dir / "params.json")
    if not isinstance(params, dict):
        raise InputError(f"{meta_dir / 'params.json'} is not a JSON object; is this a Meta Llama params.json?")
    for key in ("dim", "n_layers", "n_heads"):
        v = params.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{meta_dir / 'params.json'}: {key} is {v!r}, expected a positive integer")
    numbered = sorted((int(p.name.split(".")[1]), p) for p in meta_dir.glob("consolidated.*.pth")
                      if p.name.split(".")[1].isdigit())
    gaps = sorted(set(range(len(numbered))) - {n for n, _ in numbered})
    if gaps:
        raise InputError(f"consolidated.{gaps[0]:02d}.pth is missing in {meta_dir} (incomplete download?)")
    for _, p in numbered:
        extra = [k for k in load_shard_safely(p) if not _known_meta_key(k, params["n_layers"])]
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise InputError(f"{p} holds tensors a Llama model of params.json's {params['n_layers']} layers has "
                             f"no place for: {', '.join(sorted(extra)[:5])}{more}")


def _known_meta_key(key: str, n_layers: int) -> bool:
    if key in _HARMLESS_META:
        return True
    parts = key.split(".")
    if parts[0] == "layers":
        return parts[1].isdigit() and int(parts[1]) < n_layers and hf_key(key) is not None
    return hf_key(key) is not None


def _refuse_absurd_inputs(meta_dir: Path, hf_dir: Path) -> None:
    """Inputs that ended in a traceback or an unbounded run: params.json sizes the shards cannot hold,
    a config of another architecture, a tokenizer.model that is neither format (an empty file)."""
    from llama_parity.releases import tokenizer_kind

    from .params_bounds import meta_dir_problem

    if problem := meta_dir_problem(meta_dir):  # before anything iterates over params.json's sizes
        raise InputError(problem)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if isinstance(cfg, dict) and cfg.get("model_type", "llama") != "llama":
        raise InputError(f"{hf_dir / 'config.json'}: model_type is {cfg.get('model_type')!r}, not 'llama': this folder "
                         "holds another architecture, not a Llama conversion")
    tok = find_tokenizer(meta_dir)
    if tok is not None:
        try:
            tokenizer_kind(tok)
        except (OSError, ValueError) as e:
            raise InputError(f"{e}; replace it with tokenizer.model from Meta's download") from None


def full_memory_need(hf_dir: Path) -> int:
    """What --memory full holds at its peak: both models in fp32 plus the runtime (measured on the
    1B shape: 13.8 GB of RSS where this gives 13.5 GB). The runtime's share scales with the model (a
    quarter of one model: activations, the bf16 copies' turnover): a fixed 1.5 GiB refused tiny models
    on a machine short of memory."""
    from .memory import model_bytes_fp32

    return 9 * model_bytes_fp32(hf_dir) // 4


def choose_memory_mode(hf_dir: Path, mode: str) -> str:
    """'full' holds both models in fp32 (then bf16) and runs transformers' from_pretrained and generate;
    'streaming' reads each side once, one layer at a time, and runs the same checks with the same
    criteria (plus a per-layer comparison and the tensor layout from_pretrained expects). 'auto'
    streams: it loses no check, its memory is bounded and it is also the faster one (1B shape: 37 s
    and 0.76 GB of RSS against 54 s and 13.8 GB; an 8B in 3.1 minutes and 1.4 GB, where full would
    need ~66 GB; benchmarks/RESULTS.md). 'full' is refused up front when it cannot fit."""
    if mode == "full":
        refuse_if_too_big(hf_dir, "--memory full", "use --memory streaming (the same checks, one layer at a time)")
    return "streaming" if mode == "auto" else mode


def refuse_if_too_big(hf_dir: Path, what: str, instead: str) -> None:
    """InputError when holding both models in fp32 would not fit in the available memory: fail in a
    second with a way out, not OOM-killed minutes later."""
    try:
        need, avail = full_memory_need(hf_dir), available_memory()
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError):  # config problems: metadata's findings
        return
    if avail is not None and need > avail:
        raise InputError(f"{what} needs about {need / 1e9:.1f} GB here (both models in fp32) and "
                         f"{avail / 1e9:.1f} GB is available: {instead}")


CHECK_SCOPES = ("all", "quick", "metadata")
MEMORY_MODES = ("auto", "full", "streaming")


@dataclass(frozen=True)
class VerifyOptions:
    """Everything that decides what `verify` judges and how, built once (cli.options_from_args, the
    pytest plugin, a caller) and handed unchanged to every path: single-process full or streamed,
    every torchrun rank (as JSON, distributed.py), `convert --verify`. A new verify option is a field
    here; no path can then drop it.

    checks: "all"; "quick" (fp32 logits and far positions: every layout and RoPE bug of the catalog,
    no cache/greedy/bf16); "metadata" (no model run: seconds for any size). instruct: which twin's
    chat metadata to expect (None: the release's). greedy_tokens: generated tokens the greedy check
    compares (None: 20 full, 8 streamed). json/html: where the report goes besides the table ("-":
    the JSON alone on stdout). nproc: ranks to launch on this machine; timeout: seconds a rank waits
    for the others."""

    device: str = "cpu"
    variant_id: str | None = None
    instruct: bool | None = None
    bf16: bool = True
    tokenizer: bool = True
    memory: str = "auto"
    checks: str = "all"
    greedy_tokens: int | None = None
    json: str | None = None
    html: str | None = None
    nproc: int | None = None
    timeout: float = 600.0

    def __post_init__(self):
        if self.checks not in CHECK_SCOPES:
            raise ValueError(f"checks={self.checks!r}: one of {', '.join(CHECK_SCOPES)}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory={self.memory!r}: one of {', '.join(MEMORY_MODES)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "VerifyOptions":
        return cls(**json.loads(text))


def verify(meta_dir: str | Path, hf_dir: str | Path, options: VerifyOptions | None = None, *, model_checks=None,
           **fields) -> VerifyReport:
    """Metadata checks (every fact of the HF folder against the Meta files and the release), then
    the model checks, then tokenizer parity, as `options` say (VerifyOptions; keyword `fields`
    replace some of them: `verify(m, h, tokenizer=False, checks="quick")`). "metadata" runs no model;
    the byte check still reads every weight. Model checks and the byte check are skipped when the
    shapes say the folder holds another model. `model_checks`, when given, runs the numerical checks
    instead of the memory modes (distributed.py: the same checks split across ranks)."""
    opts = replace(options or VerifyOptions(), **fields)
    meta_dir, hf_dir = Path(meta_dir), Path(hf_dir)
    check_dirs(meta_dir, hf_dir, opts.device)
    # transformers is imported by the model and tokenizer checks alone: until `imported()`, nothing
    # here imports it (a second thread's import of it would get its half-built module object)
    imported = _import_transformers_meanwhile() if opts.checks != "metadata" or opts.tokenizer else None
    report = VerifyReport(str(meta_dir), str(hf_dir), opts.device, scope=opts.checks, models_run=False)
    ahead = None
    try:
        # One identification (release, twin, why) for every check below; an ambiguity is bad input.
        ident = identify_checkpoint(meta_dir, variant_id=opts.variant_id, instruct=opts.instruct,
                                    hf_dir=hf_dir).require()
        rope = expected_rope_scaling(meta_dir, ident=ident)
        found, meta, hf = metadata_checks(meta_dir, hf_dir, rope, ident=ident)
    except IdentifyError as e:
        raise InputError(str(e)) from None
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise InputError(f"cannot read the models: {type(e).__name__}: {e}") from None
    finally:
        if imported is not None:  # also when the inputs are refused: the caller may import transformers next
            imported()
    report.checks += found
    report.notes += meta.evidence
    if opts.checks == "metadata":
        report.notes.append("model checks not run (metadata only): run without --metadata-only for logits parity")
    elif not structure_ok(found):
        report.notes.append("model checks not run: the HF folder's shapes or dims are not the Meta checkpoint's "
                            "(see the failed checks), so transformers would build another model")
    else:
        ahead = _meta_bytes_ahead(meta_dir, hf_dir, meta, hf, opts, model_checks)
        try:
            _model_checks(report, meta_dir, hf_dir, rope, meta, hf, opts, model_checks)
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            raise
    # The tokenizer is proven while the byte check reads: that one mostly waits on the disk, this
    # one is CPU work (seconds on a 128k vocabulary); its checks still follow the byte check's.
    tokenizer = VerifyReport(report.meta_dir, report.hf_dir, report.device)
    tokenizer_done = _in_background(_tokenizer_check, tokenizer, meta_dir, hf_dir, ident,
                                    thread="llama-parity-tokenizer") \
        if opts.tokenizer and structure_ok(found) else None
    if structure_ok(found):
        _exact_bytes(report, meta_dir, hf_dir, meta, hf, ahead)
    if opts.tokenizer:
        tokenizer_done() if tokenizer_done else _tokenizer_check(tokenizer, meta_dir, hf_dir, ident)
        report.checks += tokenizer.checks
        report.notes += tokenizer.notes
        report.tokenizer = tokenizer.tokenizer
    else:
        report.notes.append("tokenizer not checked (--no-tokenizer)")
    return report


def _import_transformers_meanwhile():
    """Import transformers' Llama modules in a thread while the metadata checks run; the returned
    function waits for it. The import is 2.3-3.8 s of CPU here (the 1B's streamed verify is 16 s at
    its floor), the metadata checks mostly wait on the disk (the tied-output check reads both 0.5 GB
    matrices of a Llama 3.2). The caller must wait before anything of its own imports transformers:
    a thread importing a module that another thread is importing waits for it and then gets the
    object that was in sys.modules, and transformers replaces its own (a lazy module) at the end of
    its import (seen: "cannot import name 'AutoConfig' from 'transformers'"). A failed import
    is not reported here: it fails again where the checks import it, with its own error."""
    import importlib
    import sys

    name = "transformers.models.llama.modeling_llama"
    if name in sys.modules:  # imported before (by this process's caller): nothing to wait for
        return lambda: None

    def quietly() -> None:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 (imported again where it is used, which raises it)
            pass
    return _in_background(quietly, thread="llama-parity-import")


def _in_background(fn, *args, thread: str):
    """Start fn(*args) in a thread named `thread`; the returned function waits for it and raises
    what it raised. A daemon thread: a signal ending verify does not wait for it."""
    import threading

    box: dict = {}

    def run():
        try:
            fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e
    t = threading.Thread(target=run, name=thread, daemon=True)
    t.start()

    def done() -> None:
        t.join()
        if "error" in box:
            raise box["error"]
    return done


def _meta_bytes_ahead(meta_dir: Path, hf_dir: Path, meta, hf, opts: VerifyOptions, model_checks):
    """The byte check's Meta side started beside a streamed verify's model checks (exact_bytes.MetaAhead:
    it fills the CPU they leave idle), or None: other modes hold whole models (memory), a distributed
    run's rank 0 reads the folders after the model checks, and shards it cannot open are left to the
    check itself, which names them."""
    if model_checks is not None or opts.memory not in ("auto", "streaming"):  # (choose_memory_mode: auto streams)
        return None
    from .exact_bytes import MetaAhead

    try:
        return MetaAhead(meta_dir, meta, hf)
    except Exception:  # noqa: BLE001 (check_exact_bytes opens them again and says why it cannot)
        return None


def _exact_bytes(report: VerifyReport, meta_dir: Path, hf_dir: Path, meta, hf, ahead=None) -> None:
    """Every weight byte against Meta's shards (exact_bytes.py), in every mode: no model needed. In a
    distributed run rank 0 alone reads the folders (after the model checks, so that no rank waits
    on it in a collective). `ahead`: the Meta side, already running (MetaAhead)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    from .attestation import build
    from .exact_bytes import check_exact_bytes

    try:
        res = check_exact_bytes(meta_dir, hf_dir, meta, hf, ahead)
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"cannot read the weights: {type(e).__name__}: {e}") from None
    report.checks += res.checks()
    report.attestation = build(res, meta)
    when = "" if ahead is None else f" (Meta's shards beside the model checks: {ahead.seconds:.1f} s)"
    report.notes.append(f"weights compared bit for bit: {res.bytes_read / 1e9:.2f} GB read in {res.seconds:.1f} s"
                        + when)


def _model_checks(report: VerifyReport, meta_dir: Path, hf_dir: Path, rope, meta, hf, opts: VerifyOptions,
                  model_checks=None) -> None:
    """Logits, KV cache, far positions, greedy, bf16. A dtype change (HF weights in another dtype than
    the checkpoint's, label matching) is judged against the rounding it implies: the reference runs
    on Meta's weights rounded to the HF dtype, compared in fp32 with the usual bound. Every path gets
    the same rounding, scope and token count (`model_checks(meta_dir, hf_dir, rope_scaling=, round_to=,
    options=)` runs them elsewhere: distributed.py)."""
    round_to = hf_weights_dtype(hf)
    round_to = round_to if round_to is not None and round_to != meta.dtype else None
    # norms kept in the checkpoint's dtype beside rounded matrices (exactly stored mixed precision)
    # are not rounded: the reference computes what the HF folder stores
    vectors = {d for n, (s, d) in hf.tensors.items() if len(s) < 2 and n.endswith("norm.weight")}
    rounding = {"round_to": round_to, **({"round_vectors": False} if vectors and round_to not in vectors else {})}
    metadata_failed = not all(c.ok for c in report.checks)
    quick, greedy_tokens = opts.checks == "quick", opts.greedy_tokens
    mode = choose_memory_mode(hf_dir, opts.memory) if model_checks is None else "distributed"
    try:
        greedy = {} if greedy_tokens is None else {"greedy_tokens": greedy_tokens}
        if model_checks is not None:
            report.checks += model_checks(meta_dir, hf_dir, rope_scaling=rope, options=opts, **rounding)
        elif mode == "streaming":
            from .streaming import STREAMED_GREEDY_TOKENS, streaming_model_checks

            report.checks += streaming_model_checks(meta_dir, hf_dir, rope_scaling=rope, device=opts.device,
                                                    bf16=opts.bf16, quick=quick, **greedy, **rounding)
            report.notes.append("streamed one layer at a time (bounded memory)" + (
                "" if quick else "; " + _greedy_cost(meta_dir, greedy_tokens or STREAMED_GREEDY_TOKENS)))
        else:
            report.checks += run_model_checks(meta_dir, hf_dir, rope_scaling=rope, device=opts.device, bf16=opts.bf16,
                                              quick=quick, **greedy, **rounding)
        report.models_run = True
        if round_to is not None:
            report.notes.append(f"HF weights are {str(round_to)[6:]}, the checkpoint {str(meta.dtype)[6:]}: the "
                                f"reference ran on Meta's weights rounded to {str(round_to)[6:]} (what this dtype "
                                "change implies)" + ("; norms as stored, not rounded" if "round_vectors" in rounding
                                                     else ""))
        if quick:
            report.notes.append("quick: fp32 logits and far positions only (kv-cache, greedy, bf16 not run)")
    except Exception as e:
        if not metadata_failed:
            if isinstance(e, (OSError, json.JSONDecodeError, KeyError)):
                raise InputError(f"cannot load the models: {type(e).__name__}: {e}") from None
            raise
        # The metadata already contradicts the checkpoint (e.g. a rope_scaling without its fields):
        # transformers refusing that config is one more symptom, not bad input.
        report.checks.append(Check("model checks", "a config transformers cannot build a model from", 1.0, 0.0, False,
                                   f"transformers could not load the HF folder: {type(e).__name__}: {e}"))


def _greedy_cost(meta_dir: Path, tokens: int) -> str:
    """What streamed greedy generation costs: its extra passes over the Meta weights, from the page
    cache when the shards fit in memory, else from the disk each time (a 70B on a 24 GiB machine)."""
    if tokens == 1:
        return "greedy generation compared 1 token (no extra pass over the Meta weights)"
    size = sum(p.stat().st_size for p in meta_dir.glob("consolidated.*.pth"))
    avail = available_memory()
    passes = f"greedy generation read the Meta weights {tokens - 1} more time{'s' * (tokens != 2)} (one per new token)"
    if avail is not None and size > avail:
        return (f"{passes}, from disk: {size / 1e9:.0f} GB each, more than the {avail / 1e9:.0f} GB of memory that "
                "could cache them; --greedy-tokens N trades tokens compared for time")
    amount = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    return f"{passes}, from the page cache ({amount})"


def _tokenizer_check(report: VerifyReport, meta_dir: Path, hf_dir: Path, ident) -> None:
    tok = find_tokenizer(meta_dir)
    if tok is None:
        report.notes.append("no tokenizer.model next to the Meta checkpoint: tokenizer parity not checked")
    elif not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer_config.json").is_file():
        report.checks.append(Check("tokenizer files", "HF directory without a tokenizer", 1.0, 0.0, False,
                                   f"no tokenizer.json in {hf_dir} (converted with --no-tokenizer? then verify "
                                   "with --no-tokenizer)"))
    else:
        from .tokenizer_check import check_tokenizer, tokenizer_release

        report.tokenizer = check_tokenizer(tok, hf_dir, release=tokenizer_release(meta_dir, ident=ident))
        report.notes += report.tokenizer.notes

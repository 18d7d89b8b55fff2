"""The `llama-parity` command line: convert, verify, inspect, diagnose, to-meta, demo, variants.

Exit codes: 0 success / parity holds; 1 parity failure (the files are readable and disagree); 2 bad
input or environment (one line, no traceback); 128+N when stopped by signal N (130 Ctrl-C, 143
SIGTERM, 129 SIGHUP), after the same cleanup as any failure; 141 (SIGPIPE), quietly, when the reader
of the output went away (`| head`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from llama_parity import __version__
from llama_parity.errors import InputError  # the converter's ConversionError too

EXIT_OK, EXIT_PARITY, EXIT_INPUT = 0, 1, 2


def _err(msg: str) -> int:
    print(f"llama-parity: {msg}", file=sys.stderr)
    return EXIT_INPUT


_UNITS = "B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024)"


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}; write a number and a unit: {_UNITS}")
    if not m.group(2):
        # A bare number used to mean bytes: `--max-shard-size 5` wrote one file per tensor.
        raise argparse.ArgumentTypeError(f"{text!r} has no unit: write e.g. {m.group(1)}GB, {m.group(1)}MB "
                                         f"or {m.group(1)}B for bytes")
    unit = (m.group(2) or "B").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    n = int(float(m.group(1)) * mult)
    if n < 1:  # 0MB meant a file per tensor
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size (e.g. 5GB, 500MB)")
    return n


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:  # also refuses 0, -1 and 1.5
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


# transformers' script flags, accepted as a drop-in. Its --model_size/--llama_version only
# cross-check what is detected from the files (the files win: a wrong version flag is exactly
# how Llama 3.2 models got rope factor 8).
_SCRIPT_VERSIONS = {"1": "llama1", "2": "llama2", "3": "llama3", "3.1": "llama3.1", "3.2": "llama3.2",
                    "3.3": "llama3.3", "Guard-3": "llama-guard-3"}


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-dir", "--input_dir", dest="input_dir", required=True,
                   help="Meta checkpoint folder (params.json, consolidated.NN.pth; tokenizer.model here or one up)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="HF output folder")
    p.add_argument("--dtype", default="auto", help="auto (keep the checkpoint's), bfloat16, float16, float32")
    p.add_argument("--variant", help="force a registry variant id (see `llama-parity variants`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--instruct", dest="instruct", action="store_true", default=None,
                   help="write instruct/chat metadata (eos list, chat template)")
    g.add_argument("--base", dest="instruct", action="store_false", help="write base-model metadata")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help=f"output file size limit, a positive number with a unit: 5GB (default), 500MB, 2GiB; "
                        f"units {_UNITS}; a bare number is refused")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-tokenizer", action="store_true", help="convert weights and configs only")
    p.add_argument("--verify-md5", action="store_true",
                   help="check every file's md5 against checklist.chk first (reports how many matched)")
    p.add_argument("--dry-run", action="store_true", help="print the detected variant and tensor plan; write nothing")
    p.add_argument("--keep-original", action="store_true",
                   help="also copy Meta's files (params.json, consolidated.NN.pth, tokenizer.model) into original/, "
                        "as the official repositories do (needs the checkpoint's size again on disk)")
    p.add_argument("--verify", action="store_true",
                   help="run `llama-parity verify` on the result and record it in the output's README.md "
                        "(exit 1 if parity fails; the output is kept for diagnosis)")
    _add_json_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
    # drop-in compatibility with transformers' convert_llama_weights_to_hf.py
    p.add_argument("--model_size", help=argparse.SUPPRESS)
    p.add_argument("--llama_version", help=argparse.SUPPRESS)
    p.add_argument("--num_shards", type=int, help=argparse.SUPPRESS)
    p.add_argument("--safe_serialization", default=None, help=argparse.SUPPRESS)
    p.add_argument("--special_tokens", default=None, help=argparse.SUPPRESS)
    p.add_argument("--push_to_hub", action="store_true", help=argparse.SUPPRESS)


def _cross_check(args, variant) -> list[str]:
    notes = []
    if args.llama_version:
        want = _SCRIPT_VERSIONS.get(args.llama_version)
        if want and want != variant.family:
            notes.append(f"--llama_version {args.llama_version} ignored: the files are {variant.label} "
                         f"(using {variant.family}'s facts, e.g. rope scaling "
                         f"{variant.rope_scaling.factor if variant.rope_scaling else 'none'})")
    if args.model_size and variant.registry_id:
        from llama_parity.releases import get

        size = get(variant.registry_id).size
        if args.model_size.upper().rstrip("B") not in (size.rstrip("B"), "30" if size == "33B" else "-"):
            notes.append(f"--model_size {args.model_size} ignored: the files are {variant.label}")
    if args.num_shards and args.num_shards != variant.num_shards:
        notes.append(f"--num_shards {args.num_shards} ignored: {variant.num_shards} shard files found")
    if args.push_to_hub:
        notes.append("--push_to_hub is not supported: verify the output, then upload it yourself")
    return notes


def _print_plan(input_dir, variant, plan, notes: list[str]) -> None:
    print(f"{input_dir}:")
    print(_table(variant.summary_rows()))
    for e in variant.evidence:
        print(f"  - {e}")
    for n in notes:
        print(f"  ! {n}")
    print(f"plan ({len(plan)} tensors, {sum(e.nbytes for e in plan) / 1e9:.3f} GB):")
    for e in plan:
        print("  " + e.describe())


def _plan_dict(variant, plan, notes: list[str]) -> dict:
    return {"variant": variant.label, "registry_id": variant.registry_id, "summary": dict(variant.summary_rows()),
            "evidence": list(variant.evidence), "notes": notes,
            "plan": [{"hf_name": e.hf_name, "meta_key": e.meta_key, "shape": list(e.shape),
                      "dtype": str(e.dtype).replace("torch.", ""), "steps": e.describe()} for e in plan]}


def cmd_inspect(args) -> int:
    from llama_parity.converter.convert import ConvertOptions, inspect

    variant, plan = inspect(args.input_dir, ConvertOptions(variant_id=args.variant))
    _print_plan(args.input_dir, variant, plan, [])
    if args.json:
        write_json(args, _plan_dict(variant, plan, []))
    return EXIT_OK


def _md5_summary(input_dir: str) -> str:
    """What --verify-md5 checked (the conversion refuses mismatches, so reaching here means they matched)."""
    from llama_parity.converter.meta_checkpoint import MetaCheckpoint

    chk = MetaCheckpoint(input_dir).checklist_path
    if chk is None:
        return "--verify-md5: no checklist.chk in the input folder, nothing to check against"
    n = sum(1 for line in chk.read_text().splitlines() if len(line.split()) == 2)
    return f"md5 sums match checklist.chk ({n} file(s))"


def cmd_convert(args) -> int:
    from llama_parity.converter.convert import ConvertOptions, dtype_arg, convert_meta_to_hf, inspect

    opts = ConvertOptions(dtype=dtype_arg(args.dtype), variant_id=args.variant, instruct=args.instruct,
                          max_shard_bytes=args.max_shard_size if isinstance(args.max_shard_size, int)
                          else _size(args.max_shard_size), overwrite=args.overwrite,
                          write_tokenizer=not args.no_tokenizer, progress=False if args.no_progress else None,
                          verify_md5=args.verify_md5, keep_original=args.keep_original,
                          publish_with=_staged_json(args) if args.json not in (None, "-") else None)
    if args.dry_run:
        variant, plan = inspect(args.input_dir, opts)
        notes = _cross_check(args, variant)
        _print_plan(args.input_dir, variant, plan, notes)
        if args.json:
            write_json(args, _plan_dict(variant, plan, notes))
        return EXIT_OK
    report = convert_meta_to_hf(args.input_dir, args.output_dir, opts)
    notes = _cross_check(args, report.variant)
    print(f"converted {args.input_dir} -> {report.output_dir}")
    print(_table(report.variant.summary_rows()))
    for e in report.variant.evidence:
        print(f"  - {e}")
    if args.verify_md5:
        print(f"  - {_md5_summary(args.input_dir)}")
    for w in report.warnings + notes:
        print(f"  ! {w}")
    gb = report.n_bytes / 1e9
    print(f"{report.n_tensors} tensors, {gb:.3f} GB in {len(report.files)} file(s), {report.seconds:.1f} s")
    result = {"notes": notes}
    code = EXIT_OK
    if args.verify:
        code, result["verify"] = _verify_and_record(args.input_dir, report.output_dir, args)
    else:
        print(_next_verify(args.input_dir, report.output_dir, _verify_flags(args)))
    if args.json == "-":
        write_json(args, report.to_dict() | result)
    elif args.json and args.verify:  # the conversion's report is in place: the verify result is added whole
        try:
            write_json(args, report.to_dict() | result)
        except OSError as e:
            return _err(f"--json {args.json}: cannot add the verify result ({e.strerror or e}); {args.json} holds the "
                        f"conversion's report, {Path(report.output_dir) / 'README.md'} the verify result")
    return code


def _staged_json(args):
    """convert --json R is all or nothing with the model: R is written whole to a temporary file once
    the model is complete, before the model folder's rename, and renamed into place right after it (R
    inside the output folder is written into the staging folder: the one rename publishes both). A
    report that cannot be written (a full disk) keeps the model from being published."""
    from .report_files import StagedFile, write_atomic

    out, dest = os.path.realpath(args.output_dir), os.path.realpath(args.json)

    def stage(report, staging: Path):
        data = json.dumps(report.to_dict() | {"notes": _cross_check(args, report.variant)}, indent=2, default=str)
        try:
            if dest.startswith(out + os.sep):  # R inside the output folder: it is part of what is renamed
                inside = staging / os.path.relpath(dest, out)
                if os.path.lexists(inside):
                    raise InputError(f"--json {args.json} would replace the converted model's own "
                                     f"{os.path.relpath(dest, out)}; choose another --json path")
                write_atomic(inside, data + "\n")
                return None
            return StagedFile(args.json, data + "\n")
        except OSError as e:
            raise InputError(f"--json {args.json}: cannot write the report ({e.strerror or e}); the converted model "
                             "was not kept either: free some space or choose another --json path") from None
    return stage


def _verify_and_record(meta_dir, hf_dir, args) -> tuple[int, dict]:
    from llama_parity.converter.model_card import record_verify

    from .memory import return_freed_memory
    from .verify import InputError, VerifyOptions, verify

    return_freed_memory()
    try:
        rep = verify(meta_dir, hf_dir, VerifyOptions(variant_id=args.variant, instruct=args.instruct,
                                                     tokenizer=not args.no_tokenizer))
    except InputError as e:
        return _err(f"converted, but verify could not run: {e}"), {"error": str(e)}
    print(rep.render())
    record_verify(hf_dir, rep)
    print(f"verify result recorded in {Path(hf_dir) / 'README.md'}")
    return (EXIT_OK if rep.ok else EXIT_PARITY), rep.to_dict()


def _verify_flags(args) -> list[str]:
    """The convert choices verify must be told about, so that the printed next step judges what was asked."""
    flags = ["--variant", args.variant] if args.variant else []
    flags += {True: ["--instruct"], False: ["--base"], None: []}[args.instruct]
    flags += ["--no-tokenizer"] if args.no_tokenizer else []
    return flags


def _next_verify(meta_dir, hf_dir, flags: list[str]) -> str:
    """The verify command to run next, quoted for a POSIX shell: pasted as is, a path with spaces works."""
    argv = ["llama-parity", "verify", "--meta-dir", str(meta_dir), "--hf-dir", str(hf_dir), *flags]
    return "next: " + " ".join(shlex.quote(a) for a in argv)


def write_json(dest, data: dict, stream=None) -> None:
    """dest: the parsed args (their --json) or a path. '-': the JSON alone on `stream` (default: the
    real stdout, which _run saved in args.json_stream; the human report went to stderr)."""
    stream = stream or getattr(dest, "json_stream", None) or sys.stdout
    dest = getattr(dest, "json", dest)
    text = json.dumps(data, indent=2, default=str)
    if dest == "-":
        print(text, file=stream, flush=True)
    else:
        from .report_files import write_atomic

        write_atomic(dest, text + "\n")  # whole or not at all, even on a signal or a full disk


def _missing_extra(args, flag: str) -> str | None:
    """Fail before the long run, not after it, when the plotting extra is missing."""
    if getattr(args, flag, None):
        from .plots import MissingExtra, require_matplotlib

        try:
            require_matplotlib(f"--{flag}")
        except MissingExtra as e:
            return str(e)
    return None


def _looks_meta(d: Path) -> bool:
    return (d / "params.json").is_file() and any(d.glob("consolidated.*.pth"))


def _looks_hf(d: Path) -> bool:
    return (d / "config.json").is_file() and not _looks_meta(d)


def swapped_dirs(meta_dir, hf_dir) -> str | None:
    """The message for --meta-dir and --hf-dir given the other way round (each folder is the other kind).
    Either may be absent (verify --attestation needs no Meta folder)."""
    if meta_dir is None or hf_dir is None:
        return None
    meta_dir, hf_dir = Path(meta_dir), Path(hf_dir)
    if meta_dir.is_dir() and hf_dir.is_dir() and _looks_hf(meta_dir) and _looks_meta(hf_dir):
        return (f"--meta-dir {meta_dir} is a Hugging Face folder and --hf-dir {hf_dir} a Meta checkpoint: did you "
                f"swap them? run: --meta-dir {shlex.quote(str(hf_dir))} --hf-dir {shlex.quote(str(meta_dir))}")
    return None


def options_from_args(args, *, judging_only: bool = False):
    """The one VerifyOptions of this command line: every path (single-process, streamed, --nproc
    ranks, bare torchrun ranks, the pytest plugin) judges with it. judging_only: the flags of
    add_judging_args and --variant alone (the pytest plugin offers no report files, ranks or
    timeout; its namespace may hold other plugins' options of those names, e.g. pytest-timeout's)."""
    from .verify import VerifyOptions

    opts = VerifyOptions(device=args.device, variant_id=args.variant, instruct=args.instruct, bf16=not args.no_bf16,
                         tokenizer=not args.no_tokenizer, memory=args.memory,
                         checks="metadata" if args.metadata_only else "quick" if args.quick else "all",
                         greedy_tokens=args.greedy_tokens)
    if judging_only:
        return opts
    return replace(opts, json=args.json, html=args.html, nproc=args.nproc, timeout=args.timeout)


def cmd_verify(args) -> int:
    from . import distributed
    from .memory import return_freed_memory
    from .verify import InputError, verify

    if swapped := swapped_dirs(args.meta_dir, args.hf_dir):
        return _err(swapped) if os.environ.get("RANK", "0") == "0" else EXIT_INPUT

    opts = options_from_args(args)
    json_stream = getattr(args, "json_stream", sys.stdout)
    if missing := _missing_extra(args, "html"):  # every rank under torchrun sees it: rank 0 speaks
        return _err(missing) if os.environ.get("RANK", "0") == "0" else EXIT_INPUT
    if args.attestation:
        return _recheck_attestation(args)
    if args.meta_dir is None:  # an official repo (or its HF cache snapshot) judged against its own original/
        original = Path(args.hf_dir or ".") / "original"
        if not args.hf_dir or not (original / "params.json").is_file():
            return _err("verify needs --meta-dir META (or an --hf-dir whose original/ holds Meta's params.json and "
                        "consolidated.NN.pth)")
        args.meta_dir = str(original)
    if len(getattr(args, "hf_dirs", None) or []) + len(getattr(args, "ggufs", None) or []) > 1:
        return _verify_many(args, opts, json_stream)
    if args.gguf or not args.hf_dir:
        return _verify_gguf(args, opts, json_stream)
    if distributed.under_torchrun():
        return distributed.run_rank(args.meta_dir, args.hf_dir, opts, json_stream)
    if opts.nproc:  # launch N ranks here; each runs this command's options
        return distributed.launch(args.meta_dir, args.hf_dir, opts, json_stream)
    return_freed_memory()
    try:
        rep = verify(args.meta_dir, args.hf_dir, opts)
    except InputError as e:
        return _err(str(e))
    return emit_verify_report(opts, rep, json_stream)


def _recheck_attestation(args) -> int:
    from .attestation import AttestationError, recheck

    try:
        res = recheck(Path(args.attestation), Path(args.hf_dir))
    except AttestationError as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"cannot read {args.hf_dir}: {e}")
    print(res.render(), flush=True)
    if args.json:
        write_json(args, res.to_dict())
    return EXIT_OK if res.ok else EXIT_PARITY


def _verify_gguf(args, opts, json_stream) -> int:
    from .verify import InputError

    if not args.gguf or args.hf_dir:
        return _err("verify needs --hf-dir HF or --gguf FILE (one of them)")
    try:
        from .gguf_judge import verify_gguf

        rep = verify_gguf(args.meta_dir, args.gguf, variant_id=args.variant, instruct=args.instruct,
                          checks="metadata" if args.metadata_only else "quick" if args.quick else "all")
    except InputError as e:
        return _err(str(e))
    return emit_verify_report(opts, rep, json_stream, measure_layers=False)


def _verify_many(args, opts, json_stream) -> int:
    """Several --hf-dir / --gguf: one report, a section per output, exit 1 if any fails (multi_verify)."""
    from .gguf_judge import GGUFInputError
    from .multi_verify import refusal, verify_many
    from .verify import InputError

    if why := refusal(args):
        return _err(why)
    try:
        multi = verify_many(args.meta_dir, getattr(args, "hf_dirs", None) or [], getattr(args, "ggufs", None) or [],
                            opts)
    except (InputError, GGUFInputError) as e:
        return _err(str(e))
    print(multi.render(), flush=True)
    if opts.json:
        write_json(opts.json, multi.to_dict(), json_stream)
    return EXIT_OK if multi.ok else EXIT_PARITY


def emit_verify_report(opts, rep, json_stream=None, *, measure_layers: bool = True) -> int:
    """How every verify ends, single-process or rank 0 of a distributed run: the text report, then
    --json and --html; the exit code says whether the files agree."""
    print(rep.render(), flush=True)
    if opts.json:
        write_json(opts.json, rep.to_dict(), json_stream)
    if opts.html:
        from .report_html import write_html

        path = write_html(rep, opts.html, variant_id=opts.variant_id, measure_layers=measure_layers)
        print(f"report: {path}", flush=True)
    return EXIT_OK if rep.ok else EXIT_PARITY


def cmd_diagnose(args) -> int:
    from llama_parity.releases import IdentifyError

    from .diagnose import diagnose
    from .verify import InputError, check_dirs, refuse_if_too_big

    if missing := _missing_extra(args, "plot"):
        return _err(missing)
    if swapped := swapped_dirs(args.meta_dir, args.hf_dir):
        return _err(swapped)
    try:
        check_dirs(Path(args.meta_dir), Path(args.hf_dir), "cpu")
        refuse_if_too_big(Path(args.hf_dir), "diagnose", "run `llama-parity verify` instead (streamed, one layer at "
                          "a time; its 'hidden states per layer' row names the first divergent layer)")
    except InputError as e:
        return _err(str(e))
    try:
        d = diagnose(args.meta_dir, args.hf_dir, variant_id=args.variant)
    except IdentifyError as e:  # releases the files cannot tell apart: verify's and convert's line
        return _err(str(e))
    print(d.render())
    if args.json:
        write_json(args, d.to_dict())
    if args.plot:
        from .parity import FP32_REL_BOUND
        from .plots import diagnosis_figure, save_png

        save_png(diagnosis_figure(d, FP32_REL_BOUND), args.plot)
        print(f"plot: {args.plot}")
    return EXIT_OK if d.parity else EXIT_PARITY


def cmd_demo(args) -> int:
    from llama_parity.converter.staging import output_lock

    keep = args.keep
    # One demo per kept folder (a second one would rebuild the files under the first), and never over files
    # the user has there (edited files were restored, added ones deleted) unless told so.
    with output_lock(Path(keep), "--keep") if isinstance(keep, str) else contextlib.nullcontext():
        if isinstance(keep, str) and Path(keep).is_dir() and any(Path(keep).iterdir()) and not args.overwrite:
            return _err(f"--keep {keep} is not empty; demo would replace what is there: choose an empty or new "
                        "folder, or pass --overwrite")
        return _demo(args)


def _demo(args) -> int:
    from .demo import run_demo

    with run_demo(args.keep, args.variant, args.device, progress=False) as (workdir, conv, rep):
        print(f"demo: tiny {conv.variant.label} checkpoint in Meta's format -> HF ({conv.n_tensors} tensors, "
              f"{conv.seconds:.2f} s)")
        print(_table(conv.variant.summary_rows()))
        print(rep.render())
        if args.json:
            write_json(args, {"conversion": conv.to_dict(), "verify": rep.to_dict(), "workdir": str(workdir),
                               "kept": bool(args.keep)})
    if args.keep:
        print(f"files kept in {workdir} (meta/ = the tiny Meta checkpoint, hf/ = its conversion)")
    else:
        print(f"files were in {workdir}, now removed (--keep [DIR] keeps them)")
    return EXIT_OK if rep.ok else EXIT_PARITY


def cmd_to_meta(args) -> int:
    from llama_parity.converter.hf_to_meta import convert_hf_to_meta

    if _looks_meta(Path(args.hf_dir)):
        return _err(f"--hf-dir {args.hf_dir} is a Meta checkpoint (params.json, consolidated.NN.pth), not a Hugging "
                    "Face folder: to-meta converts HF -> Meta; for Meta -> HF run: llama-parity convert --input-dir "
                    f"{shlex.quote(str(args.hf_dir))} --output-dir HF_DIR")

    rep = convert_hf_to_meta(args.hf_dir, args.output_dir, num_shards=args.num_shards, overwrite=args.overwrite,
                             tokenizer=args.tokenizer)
    print(f"converted {args.hf_dir} -> {rep.output_dir} ({rep.num_shards} shard(s), {rep.family})")
    for n in rep.notes:
        print(f"  - {n}")
    print(_next_verify(rep.output_dir, args.hf_dir, ["--instruct" if rep.instruct else "--base"]))
    return EXIT_OK


def cmd_variants(args) -> int:
    from llama_parity.releases import VARIANTS

    print(f"{'id (--variant)':30s} {'HF repository':40s} {'shards':6s} {'tied':5s}rope scaling")
    for v in VARIANTS:
        rs = f"rope x{v.rope_scaling.factor:g}" if v.rope_scaling else ""
        print(f"{v.id:30s} {v.hf_repo:40s} MP{v.num_shards:<4d} {'tied' if v.tie_word_embeddings else '':5s}{rs}")
    return EXIT_OK


def _add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH",
                   help="also write the result as JSON to PATH; '-' writes the JSON alone to stdout "
                        "(the human report then goes to stderr), e.g. for jq")


class _EachOutput(argparse.Action):
    """--hf-dir / --gguf given once or more (verify judges several outputs in one run): the first stays in
    args.hf_dir / args.gguf, as every single-output path reads it; all are in args.hf_dirs / args.ggufs."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "s", [*(getattr(namespace, self.dest + "s", None) or []), values])


def _add_pair_args(p: argparse.ArgumentParser, *, meta_required: bool = True, hf_required: bool = True) -> None:
    """--meta-dir/--hf-dir, with the underscore spellings `convert` accepts from transformers' script.
    verify requires neither: --meta-dir defaults to the HF folder's original/, --gguf stands for
    --hf-dir, --attestation needs no Meta checkpoint (checked in cmd_verify)."""
    p.add_argument("--meta-dir", "--meta_dir", dest="meta_dir", required=meta_required,
                   help="Meta checkpoint folder (params.json, consolidated.NN.pth; tokenizer.model here or one up)"
                        + ("" if meta_required else "; default: the HF folder's original/ (official repos, HF cache "
                           "snapshots)"))
    p.add_argument("--hf-dir", "--hf_dir", dest="hf_dir", required=hf_required,
                   **({} if hf_required else {"action": _EachOutput}),
                   help="Hugging Face model folder to judge (config.json, *.safetensors, tokenizer files)"
                        + ("" if hf_required else "; verify: repeat it (and --gguf) to judge several outputs of one "
                           "checkpoint in one report"))
    add_variant_arg(p.add_argument)


def add_variant_arg(add) -> None:
    add("--variant", default=None, help="registry id (see `llama-parity variants`) when params.json and the folder "
                                        "name cannot tell the release, e.g. which RoPE factor it was trained with")


def add_judging_args(add, add_exclusive=None) -> None:
    """The verify flags that change what is judged (besides --variant), for verify's parser and the
    pytest plugin alike (`add`: argparse's add_argument or pytest's addoption; `add_exclusive`: a
    mutually exclusive group's, where the parser has groups). options_from_args reads them."""
    add_exclusive = add_exclusive or add
    add("--device", default="cpu", help="cpu (default) or cuda[:N]: where both models run")
    add("--no-bf16", action="store_true", help="skip the bf16 logits check")
    add("--memory", choices=["auto", "full", "streaming"], default="auto",
        help="streaming: one layer of each model at a time, every check (bounded memory, any size); "
             "full: both whole models in memory (transformers' from_pretrained and generate); "
             "auto (default): streaming")
    add("--no-tokenizer", action="store_true", help="skip tokenizer parity")
    add("--greedy-tokens", type=_positive_int, metavar="N", default=None,
        help="tokens the greedy generation check compares (default 20 with --memory full, 8 streamed, "
             "where each token after the first re-reads the Meta weights: from disk when they do not "
             "fit in memory)")
    add("--metadata-only", action="store_true",
        help="no model run: config, generation_config, tensor names/shapes/dtypes and every weight byte "
             "(one read of both folders at disk speed); ends METADATA OK (models not run)")
    add("--quick", action="store_true",
        help="metadata, fp32 logits, far positions and the tokenizer rows (unless --no-tokenizer); "
             "no kv-cache, greedy or bf16 checks")
    add_exclusive("--instruct", dest="instruct", action="store_true", default=None,
                  help="expect instruct/chat metadata (as converted with --instruct)")
    add_exclusive("--base", dest="instruct", action="store_false", default=None, help="expect base-model metadata")


def _add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="judge an HF folder against the Meta checkpoint (exit 0 ok, 1 parity failure, 2 bad input)")
    _add_pair_args(p, meta_required=False, hf_required=False)
    p.add_argument("--attestation", metavar="REPORT",
                   help="re-check --hf-dir against the attestation in a verify --json REPORT (one read of the "
                        "folder, no Meta checkpoint): names each file or tensor that changed since; exit 0 same, "
                        "1 changed")
    p.add_argument("--gguf", metavar="FILE", action=_EachOutput,
                   help="judge a llama.cpp GGUF file instead of an HF folder (repeatable): metadata, "
                   "tokenizer, every weight (bound per quantisation type) and the outputs (needs the gguf extra)")
    _add_json_arg(p)
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report with charts: measured "
                                                  "vs bound, error per layer and per position (needs the plot extra)")
    add_judging_args(p.add_argument, p.add_mutually_exclusive_group().add_argument)
    p.add_argument("--nproc", type=int, metavar="N", help="run across N processes on this machine (torchrun), "
                   "each streaming a range of layers of both models; under torchrun, ranks come from it")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="distributed runs: seconds a rank waits for the others before giving up (default 600)")
    p.set_defaults(func=cmd_verify, verify_parser=p)


def _add_other_parsers(sub) -> None:
    p = sub.add_parser("inspect", help="what a Meta checkpoint is and what conversion would write")
    p.add_argument("--input-dir", "--input_dir", dest="input_dir", required=True, help="Meta checkpoint folder")
    p.add_argument("--variant", help="force a registry variant id (see `llama-parity variants`)")
    _add_json_arg(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("diagnose", help="first divergent layer and the known bug that explains it")
    _add_pair_args(p)
    _add_json_arg(p)
    p.add_argument("--plot", metavar="PATH", help="also draw a PNG: error per layer (where divergence starts) and "
                                                  "per position (RoPE bugs grow with it); needs the plot extra")
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("demo", help="build, convert and verify a tiny checkpoint (no download needed)")
    p.add_argument("--variant", default="llama3.2-1b-instruct", help="which release's layout to build in tiny "
                                                                    "(default llama3.2-1b-instruct; see `llama-parity variants`)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--keep", metavar="DIR", nargs="?", const=True,
                   help="keep the tiny checkpoint and its conversion (in DIR, which must be empty or new, or in a "
                        "temporary folder that is printed); by default they are removed")
    p.add_argument("--overwrite", action="store_true", help="with --keep DIR: replace what DIR holds")
    _add_json_arg(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("to-meta", help="Hugging Face folder -> Meta checkpoint (params.json + consolidated.NN.pth)")
    p.add_argument("--hf-dir", "--hf_dir", dest="hf_dir", required=True, help="Hugging Face LlamaForCausalLM folder")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                   help="where to write params.json and consolidated.NN.pth")
    p.add_argument("--num-shards", type=_positive_int, metavar="N",
                   help="model-parallel shards, a positive whole number (default: the release's, else 1)")
    p.add_argument("--tokenizer", help="tokenizer.model to place next to the shards")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_to_meta)
    p = sub.add_parser("variants", help="list the known releases")
    p.set_defaults(func=cmd_variants)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other refusal (argparse printed its usage block first);
    `--help` still shows the usage."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"llama-parity: {self.prog.removeprefix('llama-parity ')}: {message} "
                              f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llama-parity", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"llama-parity {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="Meta checkpoint -> Hugging Face LlamaForCausalLM folder")
    _add_convert_args(p)
    p.set_defaults(func=cmd_convert)
    _add_verify_parser(sub)
    _add_other_parsers(sub)
    return ap


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised in the main thread so that every cleanup (`finally`,
    `except BaseException`) runs exactly as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# What `timeout`, systemd, Kubernetes, Slurm and a closed terminal send, besides Ctrl-C.
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_FIRED: list[int] = []  # the signal main's handlers answered (raised as Interrupted), if one did


def _install_signal_handlers() -> dict:
    """Each signal raises Interrupted once; repeats are ignored while the cleanup runs."""
    import signal
    import threading

    fired = _FIRED
    fired.clear()  # this run's, not an earlier main()'s in the same process
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        # Only a conversion has renames to finish; a command that never loaded the converter (verify)
        # has none, and must not import it (the judge stands apart from the converter).
        staging = sys.modules.get("llama_parity.converter.staging")
        if fired or (staging is not None and staging.defer_signal(signum)):
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {}
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's choice stands
            previous[sig] = signal.signal(sig, handler)
    return previous


def _interrupted(e: KeyboardInterrupt) -> int:
    import signal

    from .distributed import speaks_on_signal

    signum = getattr(e, "signum", signal.SIGINT)
    # a torchrun rank stopped before its own handlers (distributed.py): one process speaks, not every rank
    return interrupted(signum) if speaks_on_signal() else 128 + signum


def interrupted(signum: int) -> int:
    """One line and the shell's code for a stop by signal (also `verify --nproc`'s launcher's)."""
    import signal

    print(f"llama-parity: interrupted by {signal.Signals(signum).name}; nothing was left half-written, "
          "inputs untouched", file=sys.stderr, flush=True)
    return 128 + signum  # the shell convention: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


def _check_outputs(args) -> None:
    """Every path the run will write, checked before it starts: a minutes-long verify must not fail at
    its last step (nor `convert --json` after writing the model). Raises OutputPathError."""
    from .report_files import check_distinct, check_not_an_input, check_output_dir, check_output_file

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 writes the reports
        return
    files = {f"--{k}": getattr(args, k, None) for k in ("json", "html", "plot")}
    check_distinct(files)
    for flag, path in files.items():
        check_output_file(path, flag)
    inputs = {"--meta-dir": [getattr(args, "meta_dir", None)], "--input-dir": [getattr(args, "input_dir", None)],
              "--hf-dir": getattr(args, "hf_dirs", None) or [getattr(args, "hf_dir", None)],
              "--gguf": getattr(args, "ggufs", None) or [getattr(args, "gguf", None)],
              "--attestation": [getattr(args, "attestation", None)]}
    check_not_an_input(files, inputs)
    if args.cmd in ("convert", "to-meta") and not getattr(args, "dry_run", False):
        check_output_dir(args.output_dir)
    if args.cmd == "demo" and isinstance(args.keep, str):
        check_output_dir(args.keep, "--keep")


def _run(args) -> int:
    """`--json -`: stdout carries the JSON alone (so `| jq` works); the human report goes to stderr."""
    from .report_files import OutputPathError

    try:
        _check_outputs(args)
    except OutputPathError as e:
        return _err(str(e))
    if getattr(args, "json", None) != "-":
        return args.func(args)
    args.json_stream = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return args.func(args)


def _openmp_threads_sleep() -> None:
    """Idle OpenMP threads sleep instead of spinning; must run before torch (and its OpenMP runtime)
    loads, so it is main's first step (importing this module changes nothing). Verify alternates file
    reads with short products; with spinning threads the same streamed 8B-shaped verify (2 layers)
    took 63 s instead of 27 s on a 2-core VM, where a spinning thread holds the core the reader
    needs. Set OMP_WAIT_POLICY yourself to override."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    import signal

    _openmp_threads_sleep()  # before parsing: a --variant argument already loads the registry (and torch)
    # before parsing too: a signal then (a torchrun rank starting while Ctrl-C stops the run) is answered
    # as any other, not with a KeyboardInterrupt traceback
    previous = _install_signal_handlers()
    try:
        try:
            return _run(build_parser().parse_args(argv))
        except Exception:
            # Interrupted raised inside code that turns it into another error: a C extension's import
            # (numpy's, under torch's: "ImportError: cannot load module more than once per process",
            # met when Ctrl-C reached a torchrun rank still importing torch) ends as the signal it was
            if _FIRED:
                raise Interrupted(_FIRED[0]) from None
            raise
    except InputError as e:
        return _err(str(e))
    except KeyError as e:
        if "unknown variant" in str(e):
            return _err(str(e).strip("'\""))
        raise
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except BrokenPipeError:  # whoever read our output went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE
    except OSError as e:  # the environment (permissions, a full disk, I/O errors), not a bug
        where = f" {e.filename}" if e.filename else ""
        return _err(f"{e.strerror or e}{where}")
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())

"""The `llama-parity` command line: convert, inspect, verify, demo.

Exit codes: 0 success / parity holds; 1 parity failure (the files are readable and disagree); 2 bad
input or environment (one line, no traceback); 128+N when stopped by signal N (130 Ctrl-C, 143
SIGTERM, 129 SIGHUP), after the same cleanup as any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llama_parity.converter.errors import ConversionError

EXIT_OK, EXIT_PARITY, EXIT_INPUT = 0, 1, 2


def _err(msg: str) -> int:
    print(f"llama-parity: {msg}", file=sys.stderr)
    return EXIT_INPUT


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * mult)


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
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="output file size limit (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--no-tokenizer", action="store_true", help="convert weights and configs only")
    p.add_argument("--verify-md5", action="store_true", help="check files against checklist.chk first")
    p.add_argument("--dry-run", action="store_true", help="print the detected variant and tensor plan; write nothing")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    p.add_argument("--no-progress", action="store_true")
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
        from llama_parity.fixtures.variants import get

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


def cmd_inspect(args) -> int:
    from llama_parity.converter.convert import ConvertOptions, inspect

    variant, plan = inspect(args.input_dir, ConvertOptions(variant_id=args.variant))
    _print_plan(args.input_dir, variant, plan, [])
    return EXIT_OK


def cmd_convert(args) -> int:
    from llama_parity.converter.convert import ConvertOptions, _dtype_arg, convert_meta_to_hf, inspect

    opts = ConvertOptions(dtype=_dtype_arg(args.dtype), variant_id=args.variant, instruct=args.instruct,
                          max_shard_bytes=args.max_shard_size if isinstance(args.max_shard_size, int)
                          else _size(args.max_shard_size), overwrite=args.overwrite,
                          write_tokenizer=not args.no_tokenizer, progress=False if args.no_progress else None,
                          verify_md5=args.verify_md5)
    if args.dry_run:
        variant, plan = inspect(args.input_dir, opts)
        _print_plan(args.input_dir, variant, plan, _cross_check(args, variant))
        return EXIT_OK
    report = convert_meta_to_hf(args.input_dir, args.output_dir, opts)
    notes = _cross_check(args, report.variant)
    print(f"converted {args.input_dir} -> {report.output_dir}")
    print(_table(report.variant.summary_rows()))
    for e in report.variant.evidence:
        print(f"  - {e}")
    for w in report.warnings + notes:
        print(f"  ! {w}")
    gb = report.n_bytes / 1e9
    print(f"{report.n_tensors} tensors, {gb:.3f} GB in {len(report.files)} file(s), {report.seconds:.1f} s")
    print(f"next: llama-parity verify --meta-dir {args.input_dir} --hf-dir {report.output_dir}")
    if args.json:
        d = report.to_dict() | {"notes": notes}
        _write_json(args.json, d)
    return EXIT_OK


def _write_json(dest: str, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


def cmd_verify(args) -> int:
    from . import distributed
    from .verify import InputError, verify

    if args.nproc:  # launch N ranks here; each runs this command without --nproc
        return distributed.launch(args, args.verify_parser)
    if distributed.under_torchrun():
        return distributed.run_rank(args)
    try:
        rep = verify(args.meta_dir, args.hf_dir, device=args.device, variant_id=args.variant,
                     bf16=not args.no_bf16, tokenizer=not args.no_tokenizer, memory=args.memory)
    except InputError as e:
        return _err(str(e))
    print(rep.render())
    if args.json:
        _write_json(args.json, rep.to_dict())
    return EXIT_OK if rep.ok else EXIT_PARITY


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose
    from .verify import InputError, _check_dirs

    try:
        _check_dirs(Path(args.meta_dir), Path(args.hf_dir), "cpu")
    except InputError as e:
        return _err(str(e))
    d = diagnose(args.meta_dir, args.hf_dir, variant_id=args.variant)
    print(d.render())
    if args.json:
        _write_json(args.json, d.to_dict())
    return EXIT_OK if d.parity else EXIT_PARITY


def cmd_demo(args) -> int:
    from .demo import run_demo

    workdir = Path(args.keep) if args.keep else None
    conv, rep = run_demo(workdir, args.variant, args.device, progress=False)
    print(f"demo: tiny {conv.variant.label} checkpoint in Meta's format -> HF ({conv.n_tensors} tensors, "
          f"{conv.seconds:.2f} s)")
    print(_table(conv.variant.summary_rows()))
    print(rep.render())
    if args.json:
        _write_json(args.json, {"conversion": conv.to_dict(), "verify": rep.to_dict()})
    return EXIT_OK if rep.ok else EXIT_PARITY


def cmd_to_meta(args) -> int:
    from llama_parity.converter.hf_to_meta import convert_hf_to_meta

    rep = convert_hf_to_meta(args.hf_dir, args.output_dir, num_shards=args.num_shards, overwrite=args.overwrite,
                             tokenizer=args.tokenizer)
    print(f"converted {args.hf_dir} -> {rep.output_dir} ({rep.num_shards} shard(s), {rep.family})")
    for n in rep.notes:
        print(f"  - {n}")
    print(f"next: llama-parity verify --meta-dir {rep.output_dir} --hf-dir {args.hf_dir}")
    return EXIT_OK


def cmd_variants(args) -> int:
    from llama_parity.fixtures.variants import VARIANTS

    for v in VARIANTS:
        rs = f"rope x{v.rope_scaling.factor:g}" if v.rope_scaling else ""
        print(f"{v.id:30s} {v.hf_repo:40s} MP{v.num_shards:<3d} {'tied' if v.tie_word_embeddings else '':5s}{rs}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-parity", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="Meta checkpoint -> Hugging Face LlamaForCausalLM folder")
    _add_convert_args(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("inspect", help="what a Meta checkpoint is and what conversion would write")
    p.add_argument("--input-dir", "--input_dir", dest="input_dir", required=True)
    p.add_argument("--variant")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="judge an HF folder against the Meta checkpoint (exit 0 ok, 1 parity failure, 2 bad input)")
    p.add_argument("--meta-dir", required=True)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help="registry id, when the folder name and params cannot tell")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 logits check")
    p.add_argument("--memory", choices=["auto", "full", "streaming"], default="auto",
                   help="full: both models in memory; streaming: one layer at a time (real 70B+ weights); "
                        "auto: stream when the models would not fit comfortably")
    p.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer parity")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    p.add_argument("--nproc", type=int, metavar="N", help="run across N processes on this machine (torchrun; "
                   "one rank per shard group, N must divide the shard count); under torchrun, ranks come from it")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="distributed runs: seconds a rank waits for the others before giving up (default 600)")
    p.set_defaults(func=cmd_verify, verify_parser=p)
    p = sub.add_parser("diagnose", help="first divergent layer and the known bug that explains it")
    p.add_argument("--meta-dir", required=True)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--variant")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("demo", help="build, convert and verify a tiny checkpoint (no download needed)")
    p.add_argument("--variant", default="llama3.2-1b-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", metavar="DIR", help="keep the tiny checkpoints in DIR")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("to-meta", help="Hugging Face folder -> Meta checkpoint (params.json + consolidated.NN.pth)")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-shards", type=int, help="model-parallel shards (default: the release's, else 1)")
    p.add_argument("--tokenizer", help="tokenizer.model to place next to the shards")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_to_meta)
    p = sub.add_parser("variants", help="list the known releases")
    p.set_defaults(func=cmd_variants)
    return ap


class Interrupted(KeyboardInterrupt):
    """A termination signal, raised in the main thread so that every cleanup (`finally`,
    `except BaseException`) runs exactly as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# What `timeout`, systemd, Kubernetes, Slurm and a closed terminal send, besides Ctrl-C.
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _install_signal_handlers() -> dict:
    """Each signal raises Interrupted once; repeats are ignored while the cleanup runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    fired: list[int] = []

    from llama_parity.converter.staging import defer_signal

    def handler(signum, frame):
        if fired or defer_signal(signum):
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

    signum = getattr(e, "signum", signal.SIGINT)
    print(f"llama-parity: interrupted by {signal.Signals(signum).name}; nothing was left half-written, "
          "inputs untouched", file=sys.stderr)
    return 128 + signum  # the shell convention: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    previous = _install_signal_handlers()
    try:
        return args.func(args)
    except ConversionError as e:
        return _err(str(e))
    except KeyError as e:
        if "unknown variant" in str(e):
            return _err(str(e).strip("'\""))
        raise
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except OSError as e:  # the environment (permissions, a full disk, I/O errors), not a bug
        where = f" {e.filename}" if e.filename else ""
        return _err(f"{e.strerror or e}{where}")
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())

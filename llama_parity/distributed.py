"""`verify` across processes, GPUs and nodes: torchrun ranks share both models, rank 0 reports.

    torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT ...] -m llama_parity verify ...
    llama-parity verify --nproc N ...          (launches the same thing on this machine)

Every rank runs the same program (SPMD) and the same checks from parity.py; only the models differ:
- Reference: Meta's model on fairscale's model-parallel layers over the unmerged shards
  (reference_model/fairscale_mp.py). The world size N divides the shard count S (rank r holds
  shard group r: S/N consecutive shards) or is a multiple of it (rank r holds a 1/(N/S) slice of
  whole heads of one shard). The collectives inside fairscale's layers give every rank the same
  full logits.
- HF: transformers' own LlamaForCausalLM, its decoder layers cut into N contiguous ranges, rank r
  holding range r only (rank 0 also the embedding, the last rank the final norm and lm_head). A
  layer held elsewhere is a pass-through; after the last layer of each range its owner broadcasts
  the hidden states to all ranks, and the last rank broadcasts the logits. So `generate`, the KV
  cache and every check run through transformers' real forward on every rank. Layer ranges rather
  than transformers' tensor parallelism: they work for every head count and world size up to the
  layer count, on gloo and NCCL alike, and load only each rank's tensors from the safetensors files.

Memory per rank: 1/N of each model in the check's dtype (fp32, then bf16), plus the embedding on
rank 0 and lm_head on the last rank. Failures: a rank that fails reports one line naming itself
and exits; torchrun's agent stops the others; every collective has a timeout (`--timeout`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

ERRORS_ENV = "LLAMA_PARITY_DIST_ERRORS"  # set by the --nproc launcher: ranks leave their one line there
# Fault injection for the teardown test: this rank fails after loading, while the others wait in a collective.
FAULT_ENV = "LLAMA_PARITY_FAIL_RANK"
EXIT_OK, EXIT_PARITY, EXIT_INPUT = 0, 1, 2


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    device: str  # "cpu" or "cuda:LOCAL_RANK"

    @classmethod
    def from_env(cls, device: str) -> "Rank":
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        return cls(rank, world, local, f"cuda:{local}" if device.startswith("cuda") else device)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def layer_ranges(n_layers: int, world: int) -> list[range]:
    """Contiguous decoder-layer ranges, sizes differing by at most one (earlier ranks get the extra)."""
    base, extra = divmod(n_layers, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world)]


def precheck(meta_dir: Path, hf_dir: Path, world: int) -> None:
    """What makes a distributed run impossible, told before any process starts (InputError, exit 2)."""
    import json

    from .verify import InputError

    n = len(list(meta_dir.glob("consolidated.*.pth")))
    if n and n % world and world % n:
        raise InputError(f"{n} shard file(s) in {meta_dir} cannot be split over {world} ranks: use a rank count "
                         f"that divides {n} or is a multiple of it (each rank runs a shard group or a shard's slice)")
    try:
        n_heads = json.loads((meta_dir / "params.json").read_text())["n_heads"]
        n_layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError):
        return  # verify's own checks name the problem
    if n_heads % world:
        raise InputError(f"{n_heads} attention heads cannot be split over {world} ranks: use a rank count that "
                         f"divides {n_heads}")
    if n_layers < world:
        raise InputError(f"{world} ranks for {n_layers} decoder layers in {hf_dir}: use at most {n_layers} ranks")


# --- HF side: transformers' model, cut into layer ranges ------------------------------------------------
class _Elsewhere(nn.Module):
    """A decoder layer another rank runs: passes hidden states through and keeps the cache's length
    right (transformers reads positions and masks from it) with a one-float-per-token placeholder."""

    def __init__(self, idx: int, tuple_output: bool):
        super().__init__()
        self.idx, self.tuple_output = idx, tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        if cache is not None:
            b, s = hidden_states.shape[:2]
            ph = hidden_states.new_zeros(b, 1, s, 1)
            cache.update(ph, ph, self.idx)
        return (hidden_states,) if self.tuple_output else hidden_states


class _Zeros(nn.Module):
    """Embedding or lm_head held by another rank: the right shape, overwritten by its broadcast."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, x):
        shape = x.shape + (self.width,) if x.dtype in (torch.long, torch.int) else x.shape[:-1] + (self.width,)
        return torch.zeros(shape, dtype=self.dtype, device=x.device)


def _broadcast_hook(src: int):
    import torch.distributed as dist

    def hook(module, inputs, output):
        t = (output[0] if isinstance(output, tuple) else output).contiguous()
        dist.broadcast(t, src=src)
        return (t,) + tuple(output[1:]) if isinstance(output, tuple) else t
    return hook


def _owned_keys(weight_map: dict[str, str], layers: range, first: bool, last: bool) -> list[str]:
    keep = []
    for k in weight_map:
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) in layers:
                keep.append(k)
        elif k == "model.norm.weight" or (first and k == "model.embed_tokens.weight") or (last and k == "lm_head.weight"):
            keep.append(k)
    return keep


def _read_owned(hf_dir: Path, keys: list[str], weight_map: dict[str, str], device: str, dtype: torch.dtype) -> dict:
    from llama_parity.formats.safetensors import SafetensorsReader

    files = SafetensorsReader(hf_dir, {weight_map[k] for k in keys})
    try:
        return {k: t.to(device=device, dtype=dtype) for k, t in files.tensors(keys)}
    finally:
        files.close()


def load_hf_rank(hf_dir: Path, r: Rank, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding only rank r's layers; collectives join the ranges."""
    import transformers
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llama_parity.formats.safetensors import read_index

    from .parity import quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype)
    ranges = layer_ranges(config.num_hidden_layers, r.world)
    mine, first, last = ranges[r.rank], r.rank == 0, r.rank == r.world - 1
    tuple_output = int(transformers.__version__.split(".")[0]) < 5
    for i in range(config.num_hidden_layers):
        if i not in mine:
            model.model.layers[i] = _Elsewhere(i, tuple_output)
    for src, rng in enumerate(ranges[:-1]):  # the owner of each range hands its output on
        model.model.layers[rng[-1]].register_forward_hook(_broadcast_hook(src))
    if not first:
        model.model.embed_tokens = _Zeros(config.hidden_size, dtype)
    weight_map = read_index(hf_dir)
    sd = _read_owned(hf_dir, _owned_keys(weight_map, mine, first, last), weight_map, r.device, dtype)
    if last:
        w = sd.pop("lm_head.weight", None)
        if w is None and config.tie_word_embeddings:
            w = sd["model.embed_tokens.weight"] if first else _read_owned(
                hf_dir, ["model.embed_tokens.weight"], weight_map, r.device, dtype)["model.embed_tokens.weight"]
        if w is None:  # as from_pretrained: an lm_head absent from the files is initialised randomly
            w = torch.empty(config.vocab_size, config.hidden_size, device=r.device, dtype=dtype).normal_(
                std=config.initializer_range)
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=r.device, dtype=dtype)
        model.lm_head.weight = nn.Parameter(w, requires_grad=False)
    else:
        model.lm_head = _Zeros(config.vocab_size, dtype)
    model.lm_head.register_forward_hook(_broadcast_hook(r.world - 1))
    model.load_state_dict(sd, assign=True, strict=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(r.device)  # buffers built off meta
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise KeyError(f"{hf_dir} lacks tensors rank {r.rank} needs: {', '.join(left[:3])}")
    if (hf_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(hf_dir))
    return model.eval()


# --- the checks, on every rank ----------------------------------------------------------------------
def model_checks_on(r: Rank):
    """parity.run_model_checks with this rank's parts of both models (same checks, same order)."""
    from llama_parity.reference_model.fairscale_mp import build_rank_model, reference_args

    from .parity import GREEDY_TOKENS, run_model_checks

    def checks(meta_dir: Path, hf_dir: Path, *, rope_scaling, bf16: bool, greedy_tokens: int = GREEDY_TOKENS):
        args = reference_args(meta_dir, rope_scaling)

        def load(dtype):
            ref = build_rank_model(meta_dir, args, r.rank, r.world, device=r.device, dtype=dtype)
            hf = load_hf_rank(hf_dir, r, dtype)
            if os.environ.get(FAULT_ENV) == str(r.rank):
                raise RuntimeError(f"failure injected by {FAULT_ENV}={r.rank}")
            return ref, hf
        return run_model_checks(meta_dir, hf_dir, rope_scaling=rope_scaling, device=r.device, bf16=bf16, loader=load,
                                greedy_tokens=greedy_tokens)
    return checks


def _fail(r: Rank | None, message: str, code: int = EXIT_INPUT) -> int:
    """One line naming the rank: to the launcher's folder when it waits for it, else to stderr."""
    line = f"rank {r.rank}: {message}" if r is not None else message
    folder = os.environ.get(ERRORS_ENV)
    if folder and r is not None:
        Path(folder, f"rank{r.rank}").write_text(f"{code}\n{line}\n")
    else:
        print(f"llama-parity: {line}", file=sys.stderr, flush=True)
    return code


def run_rank(args) -> int:
    """One torchrun rank of `verify`: rank 0 prints the report; exit codes as single-process verify."""
    import signal

    import torch.distributed as dist

    from .verify import InputError, verify

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's agent stops ranks when one fails: quietly
    r = Rank.from_env(args.device)
    try:
        precheck(Path(args.meta_dir), Path(args.hf_dir), r.world)
    except InputError as e:  # every rank sees the same files: only rank 0 speaks
        return _fail(None, str(e)) if r.rank == 0 else EXIT_INPUT
    try:
        if r.device.startswith("cuda"):
            torch.cuda.set_device(r.local_rank)
        timeout = timedelta(seconds=args.timeout)
        dist.init_process_group(r.backend, timeout=timeout)
        from llama_parity.reference_model.fairscale_mp import init_model_parallel

        init_model_parallel(r.world, timeout)
        rep = verify(args.meta_dir, args.hf_dir, device=args.device, variant_id=args.variant, bf16=not args.no_bf16,
                     tokenizer=not args.no_tokenizer and r.rank == 0, model_checks=model_checks_on(r),
                     greedy_tokens=getattr(args, "greedy_tokens", None))
    except InputError as e:
        return _fail(r, str(e))
    except Exception as e:  # noqa: BLE001 (a dead peer, a timeout, a damaged file: one line, exit 2)
        return _fail(r, _describe(e, args.timeout))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if r.rank != 0:
        return EXIT_OK
    rep.notes.append(_layout_note(Path(args.meta_dir), Path(args.hf_dir), r))
    from .cli import emit_verify_report

    # No per-layer chart in the HTML: measuring it would load both whole models into rank 0, the
    # memory the distributed run exists to avoid (the report says so and names `diagnose`).
    return emit_verify_report(args, rep, measure_layers=False)


def _layout_note(meta_dir: Path, hf_dir: Path, r: Rank) -> str:
    import json

    n_shards = len(list(meta_dir.glob("consolidated.*.pth")))
    g, k = max(1, n_shards // r.world), max(1, r.world // n_shards)
    ranges = layer_ranges(int(json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]), r.world)

    def shards(i: int) -> str:
        if k > 1:
            return f"shard {i // k:02d} piece {i % k + 1}/{k}"
        return f"shard{'s' if g > 1 else ''} {i * g:02d}{f'-{i * g + g - 1:02d}' if g > 1 else ''}"
    parts = [f"rank {i}: {shards(i)}, HF layers {x.start}-{x.stop - 1}" for i, x in enumerate(ranges)]
    return f"distributed over {r.world} ranks ({r.backend}): " + "; ".join(parts)


def _describe(e: Exception, timeout: float) -> str:
    text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    low = str(e).lower()
    if "timed out" in low or "timeout" in low:
        return f"no answer from another rank within {timeout:g} s (a rank stopped or hangs): {text[:200]}"
    if "connection" in low or "peer" in low or "broken pipe" in low:
        return f"lost contact with another rank (it stopped): {text[:200]}"
    return f"{type(e).__name__}: {text[:300]}"


# --- `llama-parity verify --nproc N`: torchrun's launcher, started from here --------------------------
def worker_argv(args, parser) -> list[str]:
    """The verify command line each rank runs: every option the user gave, except --nproc."""
    import argparse

    out = []
    for a in parser._actions:
        if not a.option_strings or a.dest in ("nproc", "help"):
            continue
        val = getattr(args, a.dest, a.default)
        if val == a.default or val is None:
            continue
        if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out.append(a.option_strings[0])
        else:
            out += [a.option_strings[0], str(val)]
    return out


def launch(args, parser) -> int:
    """Start N ranks on this machine with torchrun's elastic launcher (rendezvous on a port the store
    picks itself: localhost:0, no race), wait, and exit as single-process verify would."""
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .verify import InputError, check_dirs

    try:
        if args.nproc < 1:
            raise InputError(f"--nproc {args.nproc}: needs at least 1 process")
        check_dirs(Path(args.meta_dir), Path(args.hf_dir), args.device)
        precheck(Path(args.meta_dir), Path(args.hf_dir), args.nproc)
    except InputError as e:
        return _fail(None, str(e))
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # failures are reported below, in one line
    from .machine import cpu_budget

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_budget() // args.nproc)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's socket warnings would bury the one line
    with tempfile.TemporaryDirectory(prefix="llama-parity-ranks-") as errors:
        # Ranks' stderr goes to files: a rank torn down mid-collective may print C++ noise
        # ("terminate called without an active exception") that would bury the one line below.
        logs = DefaultLogsSpecs(log_dir=str(Path(errors) / "logs"), redirects=Std.ERR)
        cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, logs_specs=logs,
                           run_id=f"llama-parity-{uuid.uuid4().hex}", rdzv_backend="c10d",
                           rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                           shutdown_timeout=5)  # a stopped rank gets SIGKILL 5 s after SIGTERM
        os.environ[ERRORS_ENV] = errors
        try:
            elastic_launch(cfg, sys.executable)("-m", "llama_parity", "verify", *worker_argv(args, parser))
            return EXIT_OK
        except ChildFailedError as e:
            return _explain(e.failures, Path(errors))
        finally:
            os.environ.pop(ERRORS_ENV, None)


def _explain(failures: dict, errors: Path) -> int:
    """The rank that failed first and why; a parity failure (rank 0 exit 1) was already reported."""
    lines = sorted(errors.glob("rank*"), key=lambda p: p.stat().st_mtime)  # written by _fail
    if lines:
        code, line = lines[0].read_text().split("\n", 1)
        return _fail(None, line.strip(), int(code))
    if 0 in failures and failures[0].exitcode == EXIT_PARITY:  # others may be stopped after it: fine
        return EXIT_PARITY
    rank, f = min(failures.items(), key=lambda kv: kv[1].timestamp)
    how = f"killed by signal {-f.exitcode}" if f.exitcode < 0 else f"exit code {f.exitcode}"
    last = _last_stderr_line(errors / "logs", rank)
    return _fail(None, f"rank {rank} stopped ({how}) without reporting why (out of memory?)"
                       + (f"; its last stderr line: {last}" if last else ""))


def _last_stderr_line(logs: Path, rank: int) -> str:
    for path in logs.glob(f"**/{rank}/stderr.log"):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return ""

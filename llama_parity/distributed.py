"""`verify` across processes, GPUs and nodes: torchrun ranks stream the layers of both models, rank 0 reports.

    python -m llama_parity.torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT ...] \
        -m llama_parity verify ...             (torchrun's arguments and launcher: torchrun_main)
    llama-parity verify --nproc N ...          (launches the same thing on this machine)
    torchrun ... -m llama_parity verify ...    (works too; torchrun's own process answers signals and
                                                failures its own way: a traceback, exit 1)

Every rank runs the single-process streamed verify (streaming.py) with the launcher's options
(verify.VerifyOptions, as JSON): the same streams, checks, criteria, dtype rounding and scope. The
decoder layers are cut into N contiguous ranges and rank r streams range r of both models, held as
stored and widened per product, one layer at a time (RankRelay): after each range its owner
broadcasts the hidden states to the others, rank 0 applies the final norm and output matrix,
judges, and tells the others each greedy token. So the rows, the verdicts and the numbers are the
single-process streamed verify's (the same operations on the same values), whatever N.

What N ranks buy: each rank reads only its 1/N of the weights, so on N machines the shards that
greedy decoding re-reads stay in each one's page cache where one machine's could not hold them all,
and each GPU holds one layer. What they do not: the ranges run one after the other (a pipeline of
one batch), so on one CPU machine --nproc is no faster than one process, and each rank's memory is
the single-process streamed verify's (one layer as stored plus the streams), not 1/N of it.
Signals: each launcher answers them (one line, 128+signal) and tells the ranks to stay silent
(AGENT_SPEAKS_ENV); under torch's own torchrun rank 0 speaks. Failures: a rank that fails reports one line naming itself and exits; torchrun's agent stops the
others; every collective has a timeout (`--timeout`). A rank that has done its part waits for rank 0
to finish (it runs the byte check after the last collective) and ends with os._exit: no teardown
runs that could abort it and make the agent stop rank 0 (_leave). The launcher keeps a verdict rank 0
handed back whole whatever another rank's exit (launch_many); it can judge several folders in one
launch of the ranks (one process group, the same code per folder).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

# no torch import here: cli.py asks speaks_on_signal() even when a signal interrupted torch's import

ERRORS_ENV = "LLAMA_PARITY_DIST_ERRORS"  # set by the --nproc launcher: ranks leave their one line there
# set by the --nproc launcher: [[meta_dir, hf_dir, VerifyOptions as JSON], ...], the folders each rank judges
JOBS_ENV = "LLAMA_PARITY_VERIFY_JOBS"
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
    from .verify import InputError

    try:
        n_layers = json.loads((meta_dir / "params.json").read_text())["n_layers"]
    except (OSError, ValueError, KeyError):
        return  # verify's own checks name the problem
    if n_layers < world:
        raise InputError(f"{world} ranks for {n_layers} decoder layers in {meta_dir}: use at most {n_layers} ranks "
                         "(each rank streams a range of layers)")


# --- the checks, on every rank ----------------------------------------------------------------------
class RankRelay:
    """streams.Relay across ranks: this rank's layer range, hidden states broadcast by each range's
    owner in range order (every rank takes part in every broadcast, so the order is the same
    everywhere), rank 0 judging."""

    def __init__(self, n_layers: int, r: Rank):
        self.ranges, self.r = layer_ranges(n_layers, r.world), r
        self.layers, self.judges = self.ranges[r.rank], r.rank == 0
        self.started = False

    def _broadcast(self, tensors: list, owners) -> None:
        import torch.distributed as dist

        for src in owners:
            for t in tensors:
                dist.broadcast(t, src=src)

    def before(self, tensors: list) -> None:
        self.started = True
        self._broadcast(tensors, range(self.r.rank))

    def after(self, tensors: list) -> None:
        self._broadcast(tensors, range(self.r.rank, self.r.world))

    def decide(self, f):
        import torch
        import torch.distributed as dist

        box = [f() if self.judges else None]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.r.device))
        return box[0]

    def gather(self, values: list) -> list:
        import torch.distributed as dist

        parts = [None] * self.r.world
        dist.all_gather_object(parts, values)
        return [v for part in parts for v in part]


def model_checks_on(r: Rank):
    """streaming.streaming_model_checks on this rank's layer range, with verify's options (scope,
    bf16, greedy tokens) and the rounding a dtype change implies; rank 0 returns the checks."""
    from .streaming import STREAMED_GREEDY_TOKENS, streaming_model_checks

    def checks(meta_dir: Path, hf_dir: Path, *, rope_scaling, round_to, options, round_vectors=True) -> list:
        n_layers = json.loads((Path(meta_dir) / "params.json").read_text())["n_layers"]
        return streaming_model_checks(meta_dir, hf_dir, rope_scaling=rope_scaling, device=r.device,
                                      bf16=options.bf16, round_to=round_to, quick=options.checks == "quick",
                                      greedy_tokens=options.greedy_tokens or STREAMED_GREEDY_TOKENS,
                                      relay=RankRelay(n_layers, r), round_vectors=round_vectors)
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


# set by a launcher that answers signals itself (--nproc, `python -m llama_parity.torchrun`): ranks stay silent
AGENT_SPEAKS_ENV = "LLAMA_PARITY_AGENT_SPEAKS"
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_reporting = False  # rank 0 has done every collective and is writing its report (see _answer_signals)


def speaks_on_signal() -> bool:
    """Whether this process says in one line that a signal stopped it: a single process, the
    launcher, or under a bare torchrun rank 0 (the others are stopped by the same signal)."""
    if not under_torchrun():
        return True
    return os.environ.get("RANK") == "0" and not os.environ.get(AGENT_SPEAKS_ENV)


def _answer_signals(r: Rank) -> None:
    """SIGINT/SIGTERM/SIGHUP end a rank at once with 128+signal, rank 0 saying so in one line (the
    other ranks are stopped by the same signal: one line is enough). Immediately, not by raising:
    a rank blocked in a collective would otherwise wait for peers that are gone, and a torn-down
    gloo group prints C++ noise. Once rank 0 writes its report (no collective left) the signal is
    raised instead, so that a report file being written is removed, not left half-written. The
    signal is answered once: Ctrl-C reaches a rank both from the terminal and from torchrun, which
    forwards it. Under a launcher that answers signals itself (AGENT_SPEAKS_ENV) it speaks instead."""
    import signal

    from .cli import _FIRED, Interrupted

    ours = [getattr(signal, n) for n in _SIGNALS if hasattr(signal, n)]

    def handler(signum, frame):
        signal.pthread_sigmask(signal.SIG_BLOCK, ours)  # a second signal waits until the process ends
        if _reporting:
            raise Interrupted(signum)
        if speaks_on_signal():
            os.write(2, f"llama-parity: interrupted by {signal.Signals(signum).name}; nothing was left "
                        "half-written, inputs untouched\n".encode())
        os._exit(128 + signum)
    if _FIRED:  # the signal came before these handlers, while this rank still imported torch, and an
        handler(_FIRED[0], None)  # import swallowed main's Interrupted: the run was stopped all the same
    for sig in ours:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)


def _jobs(meta_dir: str, hf_dir: str, opts) -> list | None:
    """What this rank judges: the launcher's jobs (JOBS_ENV: its options exactly, for one folder or
    several judged in one group), or this command line's under a bare torchrun."""
    from .verify import VerifyOptions

    if os.environ.get(JOBS_ENV):
        return [(m, h, VerifyOptions.from_json(o)) for m, h, o in json.loads(os.environ[JOBS_ENV])]
    return None if opts.nproc else [(meta_dir, hf_dir, opts)]


def run_rank(meta_dir: str, hf_dir: str, opts, json_stream=None) -> int:
    """One torchrun rank of `verify`: rank 0 reports; exit codes as single-process verify. Under the
    --nproc launcher the options (or several folders' jobs) come from it and rank 0 hands the reports
    back to it, which prints them as single-process verify would (--json - included). Once a rank has
    started judging it ends through _leave (no teardown that could turn its result into a crash)."""
    from .memory import return_freed_memory
    from .verify import InputError

    r = Rank.from_env(opts.device)
    _answer_signals(r)
    return_freed_memory()  # as single-process verify: weight pieces freed go back to the system
    jobs = _jobs(meta_dir, hf_dir, opts)
    if jobs is None:
        return _fail(None, "--nproc under torchrun: torchrun already started the ranks (drop --nproc)") \
            if r.rank == 0 else EXIT_INPUT
    try:
        for m, h, _ in jobs:
            precheck(Path(m), Path(h), r.world)
    except InputError as e:  # every rank sees the same files: only rank 0 speaks
        return _fail(None, str(e)) if r.rank == 0 else EXIT_INPUT
    _leave(r, _judge_jobs(r, jobs, json_stream))


def _judge_jobs(r: Rank, jobs: list, json_stream) -> int:
    """Every job judged in one process group, each by verify() with this rank's share of the model
    checks (the same function single-process verify runs); rank 0 reports each, exit code the worst."""
    import torch
    import torch.distributed as dist

    from .verify import InputError, verify

    timeout = max(o.timeout for _, _, o in jobs)
    try:
        if r.device.startswith("cuda"):
            torch.cuda.set_device(r.local_rank)
        dist.init_process_group(r.backend, timeout=timedelta(seconds=timeout))
        # --metadata-only runs no collective: rank 0 alone judges (the others would only compete for its cores)
        reports = [verify(m, h, o, tokenizer=o.tokenizer and r.rank == 0, model_checks=model_checks_on(r))
                   for m, h, o in jobs if r.rank == 0 or o.checks != "metadata"]
    except InputError as e:  # the files' fault: every rank reading the same files meets it alike
        return EXIT_INPUT if r.rank != 0 and _rank0_ended(r, 30.0) else _fail(r, str(e))
    except Exception as e:  # noqa: BLE001 (a dead peer, a timeout, a damaged file: one line, exit 2)
        return _fail(r, _describe(e, timeout))
    return EXIT_OK if r.rank != 0 else _report(r, jobs, reports, json_stream)


def _report(r: Rank, jobs: list, reports: list, json_stream) -> int:
    """Rank 0, every collective done: the reports printed and written (or handed back to the --nproc
    launcher). A signal now is raised (_answer_signals): a report file is written whole or removed."""
    global _reporting
    from .cli import emit_verify_report, interrupted

    _reporting = True
    try:
        for rep, (m, _, o) in zip(reports, jobs):
            rep.notes.append(_layout_note(json.loads((Path(m) / "params.json").read_text())["n_layers"], r, o.memory))
        if os.environ.get(ERRORS_ENV):
            return _hand_back(reports, [o for _, _, o in jobs], Path(os.environ[ERRORS_ENV]))
        return max(emit_verify_report(o, rep, json_stream, measure_layers=False)
                   for rep, (_, _, o) in zip(reports, jobs))
    except KeyboardInterrupt as e:  # cli.Interrupted, raised by _answer_signals' handler
        return interrupted(e.signum) if speaks_on_signal() else 128 + e.signum


_DONE_KEY = "llama-parity/rank0-done"


def _rank0_ended(r: Rank, seconds: float) -> bool:
    """Whether rank 0 says it is done within `seconds` (_leave): a rank that met bad input then leaves
    the one line to rank 0, which read the same files (one line, not one per rank); it speaks itself
    when rank 0 did not end (a file missing on this node only)."""
    import torch.distributed as dist

    deadline = time.monotonic() + seconds
    try:
        store = dist.distributed_c10d._get_default_store()
        while time.monotonic() < deadline:
            if store.check([_DONE_KEY]):
                return True
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 (the store is gone: rank 0 has ended the run)
        return True
    return False


def _leave(r: Rank, code: int):
    """How a rank process ends once its result is known. Rank 0 says it is done (a key in the group's
    store); the others wait for that before leaving, so the agent never stops rank 0 (still running
    the byte check, after the last collective) because another rank's exit went wrong. Then stdout and
    stderr are flushed and the process ends with os._exit: no process-group teardown, no interpreter
    shutdown. Both ran C++ destructors while a peer still worked or a helper thread was alive, and a
    rank once aborted there ("terminate called without an active exception"), turning a verdict into
    a crash. The kernel closes the sockets; every file was written and closed before."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    try:
        if store is not None and r.rank == 0:
            store.set(_DONE_KEY, "1")
        elif store is not None and code == EXIT_OK:
            while not store.check([_DONE_KEY]):
                time.sleep(0.2)
    except Exception:  # noqa: BLE001 (the store is gone: rank 0's side has ended the run)
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _hand_back(reports: list, options: list, folder: Path) -> int:
    """Rank 0 under the launcher: the reports go to the launcher's folder (the launcher prints them on
    its own stdout or stderr, and writes --json); HTML files are written here, where the reports are."""
    got = []
    for rep, opts in zip(reports, options):
        html = None
        if opts.html:
            from .report_html import write_html

            html = str(write_html(rep, opts.html, variant_id=opts.variant_id, measure_layers=False))
        got.append({"ok": rep.ok, "text": rep.render(), "report": rep.to_dict(), "html": html})
    tmp = folder / "report.json.tmp"
    tmp.write_text(json.dumps(got, default=str))
    tmp.rename(folder / "report.json")  # whole or absent
    return EXIT_OK


def _layout_note(n_layers: int, r: Rank, memory: str) -> str:
    ranges = layer_ranges(n_layers, r.world)
    parts = "; ".join(f"rank {i}: layers {x.start}-{x.stop - 1}" for i, x in enumerate(ranges))
    full = " (--memory full is for one process: ranks always stream)" if memory == "full" else ""
    return f"distributed over {r.world} ranks ({r.backend}), each streaming its layers of both models: {parts}{full}"


def _describe(e: Exception, timeout: float) -> str:
    text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    low = str(e).lower()
    if "timed out" in low or "timeout" in low:
        return f"no answer from another rank within {timeout:g} s (a rank stopped or hangs): {text[:200]}"
    if "connection" in low or "peer" in low or "broken pipe" in low:
        return f"lost contact with another rank (it stopped): {text[:200]}"
    return f"{type(e).__name__}: {text[:300]}"


# --- `llama-parity verify --nproc N`: torchrun's launcher, started from here --------------------------
def launch(meta_dir: str, hf_dir: str, opts, json_stream=None) -> int:
    """Start N ranks on this machine with torchrun's elastic launcher, wait, and end as single-process
    verify would: the report printed here (so `--json -` keeps the table on stderr), exit 0/1/2, and
    SIGINT/SIGTERM/SIGHUP answered with one line and 130/143/129 after the ranks are stopped."""
    got = launch_many([(meta_dir, hf_dir, opts)], opts)
    return got if isinstance(got, int) else _emit(got[0], opts, json_stream)


def launch_many(jobs: list, opts) -> list[dict] | int:
    """Judge several folders in one launch of opts.nproc ranks (one rendezvous, one torch import per
    rank, one process group): each job (meta_dir, hf_dir, VerifyOptions) exactly as `verify --nproc N`
    judges it alone, by the same rank code. Returns rank 0's reports ({"ok", "text", "report", "html"},
    in job order) or, when the launch failed, its exit code (its one line printed)."""
    from .verify import InputError, check_dirs

    try:
        if opts.nproc < 1:
            raise InputError(f"--nproc {opts.nproc}: needs at least 1 process")
        for meta_dir, hf_dir, o in jobs:
            check_dirs(Path(meta_dir), Path(hf_dir), o.device)
            precheck(Path(meta_dir), Path(hf_dir), opts.nproc)
    except InputError as e:
        return _fail(None, str(e))
    os.environ[JOBS_ENV] = json.dumps([[str(m), str(h), replace(o, nproc=None).to_json()] for m, h, o in jobs])
    try:
        return _run_agent(str(jobs[0][0]), str(jobs[0][1]), opts)
    finally:
        os.environ.pop(JOBS_ENV, None)


def _run_agent(meta_dir: str, hf_dir: str, opts) -> list[dict] | int:
    """torchrun's elastic agent on this machine (rendezvous on a port the store picks itself:
    localhost:0, no race) running `python -m llama_parity verify` in opts.nproc ranks."""
    import signal

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    _quiet_torch_loggers()  # failures and signals are reported below, in one line
    from .machine import cpu_budget

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpu_budget() // opts.nproc)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's socket warnings would bury the one line
    ours = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with tempfile.TemporaryDirectory(prefix="llama-parity-ranks-") as errors:
        # Ranks' stderr goes to files: a rank torn down mid-collective may print C++ noise
        # ("terminate called without an active exception") that would bury the one line below.
        logs = DefaultLogsSpecs(log_dir=str(Path(errors) / "logs"), redirects=Std.ERR)
        cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=opts.nproc, logs_specs=logs,
                           run_id=f"llama-parity-{uuid.uuid4().hex}", rdzv_backend="c10d",
                           rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                           shutdown_timeout=5)  # a stopped rank gets SIGKILL 5 s after SIGTERM
        os.environ[ERRORS_ENV] = errors
        os.environ[AGENT_SPEAKS_ENV] = "1"
        report = Path(errors) / "report.json"
        try:
            elastic_launch(cfg, sys.executable)("-m", "llama_parity", "verify", "--meta-dir", str(meta_dir),
                                                "--hf-dir", str(hf_dir))
        except ChildFailedError as e:
            if not report.is_file():
                return _explain(e.failures, Path(errors))
            _after_report(e.failures)  # rank 0 had handed its reports back whole: the verdict stands
        except SignalException as e:  # the agent has stopped the ranks with the same signal
            from .cli import interrupted

            return interrupted(e.sigval)
        finally:
            os.environ.pop(ERRORS_ENV, None)
            os.environ.pop(AGENT_SPEAKS_ENV, None)
            for sig, handler in ours.items():  # torch's handlers raise SignalException: not after the run
                signal.signal(sig, handler)
        if not report.is_file():
            return _fail(None, "the ranks ended without a report (rank 0 stopped early?)")
        return json.loads(report.read_text())


def _after_report(failures: dict) -> None:
    """A rank that failed after rank 0 had the whole verdict (every collective done, the reports
    written): the first one said in one line on stderr (the agent then stops the others: not news);
    it changes nothing the report says."""
    rank, f = min(failures.items(), key=lambda kv: kv[1].timestamp)
    how = f"signal {-f.exitcode}" if f.exitcode < 0 else f"exit code {f.exitcode}"
    print(f"llama-parity: note: rank {rank} ended with {how} after the report was complete (the verdict stands)",
          file=sys.stderr, flush=True)


def _emit(got: dict, opts, json_stream) -> int:
    """The report rank 0 handed back, ended as emit_verify_report ends a single-process verify."""
    from .cli import write_json

    print(got["text"], flush=True)
    if opts.json:
        write_json(opts.json, got["report"], json_stream)
    if got["html"]:
        print(f"report: {got['html']}", flush=True)
    return EXIT_OK if got["ok"] else EXIT_PARITY


def _explain(failures: dict, errors: Path) -> int:
    """The rank that failed first and why; a parity failure (rank 0 exit 1) was already reported."""
    lines = sorted(errors.glob("rank*"), key=lambda p: p.stat().st_mtime)  # written by _fail
    if lines:
        code, line = lines[0].read_text().split("\n", 1)
        return _fail(None, line.strip(), int(code))
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


def _quiet_torch_loggers() -> None:
    """torch's elastic loggers each set their own level when created (so the parents' level is not
    enough): quiet every one that exists by now (import the launcher's modules first)."""
    import logging

    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


# --- `python -m llama_parity.torchrun ARGS`: torchrun itself, ending as single-process verify --------
def torchrun_main(argv: list[str]) -> int:
    """torchrun with torchrun's own arguments (torch's parser: --nnodes, --rdzv-endpoint, Slurm...),
    run in this process so that it ends as single-process verify does: SIGINT/SIGTERM/SIGHUP stop
    the ranks and end with one line and 130/143/129 (torchrun's own answer is a traceback and exit
    1, the "parity failed" code), a failed rank's code (it said why in one line; a rank killed
    without a word is named), torch's launcher logs quiet. Signals are answered from this
    function's first line, before torch is imported (an early one would otherwise end the run
    silently)."""
    import signal

    from .cli import Interrupted, interrupted

    fired: list[int] = []

    def early(signum, frame):  # until torch's agent installs its own handlers, and after it
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)
    previous = {}
    for name in _SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, early)
    try:
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        args = parse_args(argv)
        _quiet_torch_loggers()
        os.environ[AGENT_SPEAKS_ENV] = "1"  # the ranks stay silent on a signal: this process speaks
        try:
            run(args)
        except SignalException as e:  # the agent has stopped the ranks with the same signal
            return interrupted(e.sigval)
        except ChildFailedError as e:
            return _rank_failed(e.failures)
        return EXIT_OK
    except KeyboardInterrupt as e:  # Interrupted, before or after the agent's own handlers
        return interrupted(getattr(e, "signum", signal.SIGINT))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _rank_failed(failures: dict) -> int:
    """The exit code of the rank that failed first: rank 0's 1 (its report says which checks
    failed) or a rank's 2 (its one line said why); a rank killed without a word is named here."""
    rank, f = min(failures.items(), key=lambda kv: kv[1].timestamp)
    if f.exitcode < 0:
        return _fail(None, f"rank {rank} stopped (killed by signal {-f.exitcode}) without reporting why "
                           "(out of memory?)")
    return f.exitcode

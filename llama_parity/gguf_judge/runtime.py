"""llama.cpp itself, through the llama-cpp-python binding (the `gguf-runtime` extra), always in a child process.

The child loads the GGUF the way llama.cpp's users do and returns (1) its tokenization of texts and
(2) its next-token logits for token-id prompts; or it quantises a GGUF (llama_model_quantize). It runs
out of process because the runtime can crash on a CPU (0.3.36 segfaults evaluating q8_0 with its
default extra buffer types, AMX/repack): a crash is then the runtime's (file, types, signal), reported
as such, never as the judge's verdict. Extra buffer types are off (use_extra_bufts=False) and the KV
cache is f32 (type_k = type_v = F32, no flash attention), so the runtime's only rounding left is that
of the activations to its matmul type (module outputs states the bound that follows).

Run as `python -m llama_parity.gguf_judge.runtime REQUEST.json`: the request names the model, the texts,
the prompts and a .npy path for the logits; the answer is one JSON line on stdout.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install 'llama-parity[gguf-runtime]' (compiles llama.cpp: ~5 min on 2 cores)"
F32 = 0  # GGML_TYPE_F32
FLASH_ATTN_DISABLED = 0
CHILD = [sys.executable, "-m", "llama_parity.gguf_judge.runtime"]  # + the request file


@dataclass
class RuntimeRun:
    """What the child returned; `failure` (a crash or the runtime's own error) means nothing else is set."""

    tokens: list[list[int]] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    failure: str | None = None
    version: str = ""
    special: dict = field(default_factory=dict)  # role -> id as llama.cpp resolves it (-1: none), "eog": [ids]
    peak_rss: int = 0  # the child's own peak RSS in bytes (llama.cpp loads the whole model: its memory, not the judge's)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def run_child(request: dict, what: str, timeout: float = 1800) -> dict:
    """Run the child on `request`; a crash or timeout comes back as {"failure": "..."} naming `what`."""
    with tempfile.TemporaryDirectory(prefix="llama-parity-rt-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({**request, "tmp": tmp}))
        try:
            r = subprocess.run([*CHILD, str(req)],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"failure": f"llama.cpp runtime timed out after {timeout:g} s on {what}"}
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            tail = " | ".join(r.stderr.strip().splitlines()[-3:])[-400:]
            return {"failure": f"llama.cpp runtime {_describe_exit(r.returncode)} on {what}" +
                    (f" (stderr: {tail})" if tail else "")}
        out = json.loads(lines[-1])
        if "failure" in out:
            return {"failure": f"{out['failure']} on {what}"}
        if "logits" in out:
            out["logits"] = [np.load(p) for p in out["logits"]]
        return out


def evaluate(gguf_path: Path, types: str, texts: list[tuple[str, bool, bool]], prompts: list[list[int]]) -> RuntimeRun:
    """llama.cpp's tokens for (text, add_special, parse_special) and its logits for each prompt."""
    out = run_child({"op": "evaluate", "model": str(gguf_path), "texts": texts, "prompts": prompts},
                    f"{gguf_path} (tensor types {types})")
    if "failure" in out:
        return RuntimeRun(failure=out["failure"])
    return RuntimeRun(out["tokens"], out["logits"], None, out.get("version", ""), out.get("special", {}),
                      int(out.get("peak_rss", 0)))


def quantize(src: Path, jobs: list[tuple[Path, int]]) -> str | None:
    """llama.cpp's llama_model_quantize (what llama-quantize runs) of `src` into each (file, llama_ftype),
    in one child: None on success, else why not."""
    out = run_child({"op": "quantize", "model": str(src), "jobs": [[str(d), int(f)] for d, f in jobs]},
                    f"quantising {src} to llama_ftypes {[f for _, f in jobs]}")
    bad = [f"{d}: llama_model_quantize returned {rc}" for (d, _), rc in zip(jobs, out.get("rc", []))
           if rc != 0]
    return out.get("failure") or ("; ".join(bad) if bad else None)


def token_cases(gf, meta, release) -> list[tuple[str, bool, bool, list[int]]]:
    """(text, add_special, parse_special, Meta's ids): the curated corpus as plain text (bos added as the
    release adds it), and the chat dialogs rendered by the GGUF's own template, special-token text
    read as the control tokens (what llama.cpp's chat mode does)."""
    from llama_parity.tokenizer_corpus import CHAT_DIALOGS, CURATED_CORPUS

    from .chat import GGUFChat

    out = [(t, True, False, meta.encode(t, bos=True, eos=False)) for t in CURATED_CORPUS]
    chat = GGUFChat(gf, meta)
    guard = release is not None and release.family == "llama-guard-3"
    if not chat.chat_template or guard:  # Guard's template needs its categories: judged by the chat checks
        return out
    for dialog in CHAT_DIALOGS:
        try:
            text = chat.apply_chat_template(list(dialog), tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render is the chat checks' finding
            continue
        out.append((text, False, True, meta.encode(text, bos=False, eos=False, allowed_special="all")))
    return out


def expected_special(meta, eos: int | None) -> dict:
    """The special tokens as Meta's code uses them: bos, the release's eos (`eos`), eot, the infilling
    pieces (Code Llama) and the stop set (Meta's stop tokens, plus Code Llama's ▁<EOT> that ends an infill);
    -1 where Meta has none (llama.cpp's LLAMA_TOKEN_NULL)."""
    def tid(x):
        return -1 if x is None else int(x)

    eot = getattr(meta, "eot_id", None)
    stop = set(getattr(meta, "stop_tokens", (meta.eos_id,))) | ({eot} if eot is not None else set())
    return {"bos": tid(meta.bos_id), "eos": tid(eos), "eot": tid(eot), "fim_pre": tid(getattr(meta, "prefix_id", None)),
            "fim_suf": tid(getattr(meta, "suffix_id", None)), "fim_mid": tid(getattr(meta, "middle_id", None)),
            "eog": sorted(stop)}


def special_check(want: dict, got: dict):
    """llama.cpp's own resolution of the special tokens (keys, or names it searches) against Meta's (bound 0)."""
    from .vocab import Acc

    acc = Acc("llama.cpp's special tokens (bos, eos, eot, infill, end-of-generation set) = Meta's",
              note="what llama.cpp itself stops on and infills with: a Code Llama GGUF without its eot key never "
              "stops an infill (llama.cpp does not find ▁<EOT> by name); -1 is none")
    for role, ids in want.items():
        acc.add(f"llama.cpp's {role}", ids, got.get(role))
    return acc.r


def token_check(cases, got: list[list[int]]):
    """llama.cpp's own encoding of every case against Meta's ids (bound 0)."""
    from .vocab import Acc

    acc = Acc("llama.cpp's own encoding (corpus, chat dialogs) = Meta's ids", note="what llama.cpp encodes "
              "from the file itself: its pre-tokenizer, vocabulary, merges/scores and space-prefix handling")
    for (text, *_, want), ids in zip(cases, got):
        acc.add(text, want, ids)
    return acc.r


# ----- the child (imports llama_cpp; nothing above does) -----

def _tokenize(L, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8", errors="surrogateescape")
    cap = len(data) + 16
    while True:
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        cap = -n


def _logits(L, model, vocab, prompts: list[list[int]], tmp: str) -> list[str]:
    import os

    n_vocab, longest = L.llama_vocab_n_tokens(vocab), max(len(p) for p in prompts)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, longest)
    threads = max(1, min(4, os.cpu_count() or 1))
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = F32
    cp.flash_attn_type = FLASH_ATTN_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    paths = []
    for j, prompt in enumerate(prompts):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        batch = L.llama_batch_init(len(prompt), 0, 1)
        for i, tok in enumerate(prompt):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(prompt)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                        for i in range(len(prompt))])
        L.llama_batch_free(batch)
        paths.append(str(Path(tmp) / f"logits{j}.npy"))
        np.save(paths[-1], out.astype(np.float32))
    L.llama_free(ctx)
    return paths


def _child(req: dict) -> dict:
    import ctypes

    import llama_cpp as L

    L.llama_backend_init()
    if req["op"] == "quantize":
        rcs = []
        for out, ftype in req["jobs"]:
            qp = L.llama_model_quantize_default_params()
            qp.ftype, qp.nthread = ftype, 2
            rcs.append(int(L.llama_model_quantize(req["model"].encode(), out.encode(), ctypes.byref(qp))))
        return {"rc": rcs}
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False  # AMX/repack buffers: 0.3.36 segfaults evaluating q8_0 with them on some CPUs
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(req["model"].encode(), mp)
    if not model:
        raise RuntimeError("llama_model_load_from_file failed (llama.cpp cannot load this file)")
    vocab = L.llama_model_get_vocab(model)
    tokens = [_tokenize(L, vocab, t, a, p) for t, a, p in req["texts"]]
    logits = _logits(L, model, vocab, req["prompts"], req["tmp"]) if req["prompts"] else []
    special = {"bos": L.llama_vocab_bos(vocab), "eos": L.llama_vocab_eos(vocab), "eot": L.llama_vocab_eot(vocab),
               "fim_pre": L.llama_vocab_fim_pre(vocab), "fim_suf": L.llama_vocab_fim_suf(vocab),
               "fim_mid": L.llama_vocab_fim_mid(vocab),
               "eog": [i for i in range(L.llama_vocab_n_tokens(vocab)) if L.llama_vocab_is_eog(vocab, i)]}
    L.llama_model_free(model)
    return {"tokens": tokens, "logits": logits, "version": getattr(L, "__version__", ""), "special": special,
            "peak_rss": _peak_rss()}


def _peak_rss() -> int:
    """This process's peak RSS in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _quiet_logs():
    """llama.cpp logs every tensor it loads on stderr; keep only errors (the crash report's tail)."""
    import ctypes

    import llama_cpp as L

    @L.llama_log_callback
    def log(level, text, user_data):
        if level >= 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode("utf-8", errors="replace"))
    L.llama_log_set(log, ctypes.c_void_p(0))
    return log  # kept alive by the caller


if __name__ == "__main__":
    _keep = _quiet_logs()
    try:
        answer = _child(json.loads(Path(sys.argv[1]).read_text()))
    except Exception as e:  # noqa: BLE001 - the runtime's own error, reported by the parent as the runtime's
        print(json.dumps({"failure": f"llama.cpp runtime error: {type(e).__name__}: {e}"}))
        sys.exit(0)
    print(json.dumps(answer))

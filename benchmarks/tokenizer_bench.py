"""Tokenizer measurements (the numbers in docs/tokenizers.md); not part of the product or the test suite.

    python -m benchmarks.tokenizer_bench [convert_llama_weights_to_hf.py]   # default loading vs ours
    python -m benchmarks.tokenizer_bench --sweep                             # every code point, 5 contexts
    python -m benchmarks.tokenizer_bench --one-merge-per-token               # why every split is a merge

The first measures transformers' default ways of loading a bare Meta tokenizer.model (and, given a
runnable copy, the output of transformers' conversion script) against ours on the real Llama 2 and
Llama 3 tokenizers, on the same curated and fuzzed strings. The second encodes every Unicode scalar
value in five contexts with Meta's tokenizer and with ours (minutes, not seconds). The third encodes
158,600 strings with a tokenizer.json holding only the merge rank-limited BPE makes of each Llama 3 token's
bytes (one per token) against Meta's tiktoken: the differences are why verify requires every split.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from llama_parity.converter.tokenizer_files import write_hf_tokenizer
from llama_parity.fixtures.tokenizers import real_llama2_tokenizer, real_llama3_tokenizer
from llama_parity.reference_model.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    detect_tokenizer_kind,
    load_meta_tokenizer,
)
from llama_parity.tokenizer_corpus import CURATED_CORPUS, fuzz_corpus
from llama_parity.tokenizer_report import ids_of


def default_loaders(tokenizer_model: Path, workdir: Path, anchor_script: Path | None = None) -> dict[str, Any]:
    """transformers' default ways to get an HF tokenizer from a bare Meta tokenizer.model.

    - `AutoTokenizer.from_pretrained(dir holding only tokenizer.model)` (automatic conversion);
    - sentencepiece: `LlamaTokenizer.from_pretrained(dir)` and `LlamaTokenizer(vocab_file=...)`;
    - tiktoken: `PreTrainedTokenizerFast.from_pretrained(dir)` (automatic tiktoken conversion);
    - both: the output of transformers' conversion script (base model, offline), reloaded with AutoTokenizer,
      when `anchor_script` (a runnable copy of convert_llama_weights_to_hf.py) is given.
    """
    import importlib.util

    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    workdir = Path(workdir)
    out: dict[str, Any] = {}
    kind = detect_tokenizer_kind(tokenizer_model)
    bare = workdir / "bare"
    bare.mkdir(parents=True, exist_ok=True)
    (bare / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    out["AutoTokenizer.from_pretrained(dir with tokenizer.model)"] = AutoTokenizer.from_pretrained(str(bare))
    if kind == "sentencepiece":
        out["LlamaTokenizer.from_pretrained(dir)"] = LlamaTokenizer.from_pretrained(str(bare))
        out["LlamaTokenizer(vocab_file=...)"] = LlamaTokenizer(vocab_file=str(tokenizer_model))
    else:
        out["PreTrainedTokenizerFast.from_pretrained(dir)"] = PreTrainedTokenizerFast.from_pretrained(str(bare))
    if anchor_script is not None and Path(anchor_script).is_file():
        spec = importlib.util.spec_from_file_location("anchor_convert_llama", str(anchor_script))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        d = workdir / "anchor"
        try:
            if kind == "sentencepiece":
                mod.write_tokenizer(str(d), str(tokenizer_model), llama_version="2")
            else:
                names = list(LLAMA3_SPECIAL_TOKENS["3.1"])
                mod.write_tokenizer(str(d), str(tokenizer_model), llama_version="3.1", special_tokens=names)
            out["conversion script output (AutoTokenizer)"] = AutoTokenizer.from_pretrained(str(d))
        except Exception as e:  # recorded as a measured fact, not hidden
            cause = e.__cause__ or e.__context__ or e
            out["conversion script output (AutoTokenizer)"] = f"failed: {type(cause).__name__}: {cause}"
    return out


def measure_encode(meta, hf, texts: list[str]) -> dict[str, int]:
    sp = isinstance(meta, SentencePieceTokenizer)
    out = {"strings": len(texts), "encode_bos": 0, "encode_nobos": 0, "decode": 0}
    for t in texts:
        m = meta.encode(t, bos=True, eos=False)
        if m != ids_of(hf(t, add_special_tokens=True)):
            out["encode_bos"] += 1
        if meta.encode(t, bos=False, eos=False) != ids_of(hf(t, add_special_tokens=False)):
            out["encode_nobos"] += 1
        if meta.decode(m) != hf.decode(m, skip_special_tokens=sp):
            out["decode"] += 1
    return out


def measure_default_vs_ours(n_fuzz: int = 2000, anchor_script: Path | None = None) -> dict[str, Any]:
    """Mismatch counts of transformers' default loading vs ours, same fuzzed and curated strings."""
    from transformers import AutoTokenizer

    specials = ("<s>", "</s>", "<unk>", "<|")  # special-token text is its own class (see check_tokenizer)
    fuzz = [t for t in fuzz_corpus(n_fuzz, seed=0) if not any(x in t for x in specials)]
    curated = [t for t in CURATED_CORPUS if not any(x in t for x in specials)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, family in (("llama2", real_llama2_tokenizer(), "llama2"),
                                    ("llama3", real_llama3_tokenizer(), "llama3.1")):
            if path is None:
                continue
            meta = load_meta_tokenizer(path, version="3.1")
            ours_dir = Path(tmp) / f"ours_{label}"
            write_hf_tokenizer(path, ours_dir, family=family, instruct=False)
            loaders = default_loaders(path, Path(tmp) / label, anchor_script)
            loaders["ours (llama-parity)"] = AutoTokenizer.from_pretrained(str(ours_dir))
            results[label] = {
                name: (tok if isinstance(tok, str) else
                       {"curated": measure_encode(meta, tok, curated), "fuzzed": measure_encode(meta, tok, fuzz)})
                for name, tok in loaders.items()
            }
    return results


SWEEP_TEMPLATES = ("a{c}b", "{c}{c} x", " {c}1", "x\n{c} ", "{c}")


def codepoint_sweep(tokenizer_model: Path, hf_dir: Path, *, templates=SWEEP_TEMPLATES, batch: int = 20000,
                    version: str = "3.1") -> dict[str, list[str]]:
    """Every Unicode scalar value in each template, Meta vs HF (no bos): the mismatching strings per template.

    Minutes, not seconds (about 5.5 million strings): a one-off measurement, not part of the test suite.
    """
    from transformers import AutoTokenizer

    meta = load_meta_tokenizer(tokenizer_model, version=version)
    tk = AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad: dict[str, list[str]] = {}
    for tmpl in templates:
        strs = [tmpl.format(c=chr(c)) for c in cps]
        for i in range(0, len(strs), batch):
            chunk = strs[i : i + batch]
            hs = [e.ids for e in tk.encode_batch(chunk, add_special_tokens=False)]
            if isinstance(meta, TiktokenTokenizer):
                ms = meta.model.encode_ordinary_batch(chunk)
            else:
                ms = meta.sp_model.encode(chunk)
            bad.setdefault(tmpl, []).extend(s for s, m, h in zip(chunk, ms, hs) if m != h)
    return bad


def _last_pair(tok: bytes, limit: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts BPE with ranks below `limit` leaves of `tok`'s bytes (None: more than two)."""
    parts = [tok[i:i + 1] for i in range(len(tok))]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        best, i = min(pairs)
        if best >= limit:
            return None
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def one_merge_per_token(n_random: int = 30000, seed: int = 0) -> dict[str, Any]:
    """Real Llama 3 with one merge per token (what rank-limited BPE makes of its bytes) against tiktoken."""
    import random

    from tokenizers import Tokenizer

    from llama_parity.reference_model.tokenizer import read_tiktoken_ranks
    from llama_parity.tokenizer_vocab import _gpt2_byte_decoder

    path = real_llama3_tokenizer()
    ranks = read_tiktoken_ranks(path)
    enc = {b: c for c, b in _gpt2_byte_decoder().items()}
    text = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_tokenizer(path, Path(tmp), family="llama3.1", instruct=False)
        t = json.loads((Path(tmp) / "tokenizer.json").read_text())
    pairs = sorted((r, p) for tok, r in ranks.items() if len(tok) > 1 and (p := _last_pair(tok, r, ranks)))
    all_splits = len(t["model"]["merges"])
    t["model"]["merges"] = [[text(a), text(b)] for _r, (a, b) in pairs]
    tk = Tokenizer.from_str(json.dumps(t))
    meta = load_meta_tokenizer(path, version="3.1")
    rng = random.Random(seed)
    toks = [b for b in ranks if len(b) > 1]
    texts = fuzz_corpus(3000, seed=1) + list(CURATED_CORPUS)
    for b in toks + [b"".join(rng.choice(toks) for _ in range(rng.randint(1, 6))) for _ in range(n_random)]:
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    hs = [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]
    bad = [s for s, m, h in zip(texts, meta.model.encode_ordinary_batch(texts), hs) if m != h]
    return {"merges (every split)": all_splits, "merges (one per token)": len(pairs),
            "unreachable tokens": sum(len(b) > 1 for b in ranks) - len(pairs), "strings": len(texts),
            "differ": len(bad), "examples": bad[:5]}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--one-merge-per-token"]:
        print(json.dumps(one_merge_per_token(), indent=2, ensure_ascii=False))
    elif sys.argv[1:2] == ["--sweep"]:
        with tempfile.TemporaryDirectory() as tmp:
            for label, path, family in (("llama2", real_llama2_tokenizer(), "llama2"),
                                        ("llama3", real_llama3_tokenizer(), "llama3.1")):
                if path is None:
                    continue
                write_hf_tokenizer(path, Path(tmp) / label, family=family, instruct=False)
                res = codepoint_sweep(path, Path(tmp) / label)
                print(label, {k: len(v) for k, v in res.items()},
                      {k: [hex(ord(c)) for s in v[:10] for c in s if ord(c) > 127] for k, v in res.items() if v})
    else:
        anchor = Path(sys.argv[1]) if len(sys.argv) > 1 else None
        print(json.dumps(measure_default_vs_ours(anchor_script=anchor), indent=2))

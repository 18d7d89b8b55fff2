"""GGUF files made by llama.cpp's own converter from our conversions, judged against Meta's checkpoint,
and a mutation catalog of the bugs that shipped in real GGUFs, each failing the check that names it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra (pip install 'llama-parity[gguf]') is not installed")

from llama_parity.converter.convert import convert_meta_to_hf  # noqa: E402
from llama_parity.fixtures.factory import make_tiny_checkpoint  # noqa: E402
from llama_parity.fixtures.tokenizers import real_llama2_tokenizer, real_llama3_tokenizer  # noqa: E402
from llama_parity.releases import get  # noqa: E402
from llama_parity.gguf_judge import read_gguf, verify_gguf  # noqa: E402
from llama_parity.gguf_judge.mutate import write_gguf  # noqa: E402

from .llamacpp import convert_to_gguf  # noqa: E402

# case -> (release, tokenizer, llama.cpp outtypes): every family's trait llama.cpp must carry
CASES = {
    "llama3.1-instruct": ("llama3.1-8b-instruct", "llama3", ("f16", "q8_0")),  # rope_freqs, GQA, eot eos
    "llama3.2-tied": ("llama3.2-1b-instruct", "llama3", ("bf16",)),  # tied, factor 32
    "llama3.3-instruct": ("llama3.3-70b-instruct", "llama3", ("f16",)),  # the 70B shape: 8 shards, 3.1's template
    "llama3-instruct": ("llama3-8b-instruct", "llama3", ("f16",)),  # 8k context, no RoPE scaling, no eom
    "guard3-1b": ("llama-guard-3-1b", "llama3", ("f16",)),  # Llama Guard 3: its own chat template, eos <|eot_id|>
    "llama2-chat": ("llama2-7b-chat", "llama2", ("f16",)),  # sentencepiece scores from tokenizer.model
    "llama2-13b-mp2": ("llama2-13b", "llama2", ("q8_0",)),  # two shards, embedding split on dim 1
    "codellama": ("codellama-7b", "codellama", ("f16",)),  # rope_theta 1e6, 16k context, infilling ids
    "llama1": ("llama1-7b", "tiny", ("f16",)),  # norm eps 1e-6, 2k context, vocab_size -1 in params.json
}
CODELLAMA_INFILL = {"▁<PRE>": 32007, "▁<SUF>": 32008, "▁<MID>": 32009, "▁<EOT>": 32010}


def codellama_tokenizer(path):
    """A 32016-piece Code Llama-shaped tokenizer.model: Llama 2's 32000 pieces, then ▁<PRE> ▁<SUF> ▁<MID>
    ▁<EOT> at Code Llama's ids 32007..32010 (the ids llama.cpp's converter writes for a 32016-piece
    vocabulary) among twelve prefix-chain pieces that make them reachable by merges. No real Code Llama
    file is available here: only those four ids are the real file's (docs/tokenizers.md)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(real_llama2_tokenizer().read_bytes())
    top = max(p.score for p in proto.pieces)
    chain = [m[:k] for m in CODELLAMA_INFILL for k in range(3, len(m))]  # ▁<P ▁<PR ▁<PRE ▁<S ... ▁<EOT
    extra = chain[:7] + list(CODELLAMA_INFILL) + chain[7:]
    for piece in extra:  # longer pieces score higher: merges run left to right up to the whole marker
        proto.pieces.add(piece=piece, score=top + len(piece), type=pb.ModelProto.SentencePiece.NORMAL)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """(meta folder, {outtype: gguf path}) per case: tiny checkpoints with the real vocabularies (llama.cpp
    only names the Llama 3 pre-tokenizer for the real one; Code Llama's from Llama 2's, and Llama 1 with a
    tiny sentencepiece file: its tokenizer is Llama 2's, proven by the Llama 2 cases), converted by us, then
    by llama.cpp."""
    root = tmp_path_factory.mktemp("gguf")
    toks = {"llama3": real_llama3_tokenizer(), "llama2": real_llama2_tokenizer(), "tiny": None,
            "codellama": codellama_tokenizer(root / "codellama-tokenizer.model")}
    out, jobs = {}, []
    for case, (vid, tok, types) in CASES.items():
        if tok == "llama3" and toks[tok] is None:
            pytest.fail("the real Llama 3 tokenizer (llama-models, a test dependency) is missing")
        meta = make_tiny_checkpoint(get(vid), root / case, tokenizer=toks[tok], dtype=torch.bfloat16)
        if tok == "llama3":  # one file for the three Llama 3 checkpoints (as a Hugging Face cache links its blobs):
            (meta / "tokenizer.model").unlink()  # our converter then parses its 128k ranks once
            (meta / "tokenizer.model").symlink_to(toks[tok])
        hf = root / f"{case}-hf"
        convert_meta_to_hf(meta, hf)
        out[case] = (meta, {t: root / f"{case}-{t}.gguf" for t in types})
        jobs += [(hf, t, root / f"{case}-{t}.gguf") for t in types]
    convert_to_gguf(jobs)
    return out


HAS_RUNTIME = importlib.util.find_spec("llama_cpp") is not None
needs_runtime = pytest.mark.skipif(not HAS_RUNTIME, reason="llama-cpp-python (the gguf-runtime extra, part of "
                                   "[test]) is not installed: llama.cpp's own rows cannot run")
RUNTIME_LOGITS = "llama.cpp: logits (KL vs the reference on the GGUF's weights)"
RUNTIME_TOKENS = "tokenizer: llama.cpp's own encoding"
RUNTIME_SPECIAL = "tokenizer: llama.cpp's special tokens"
# the files judged in full (outputs, and llama.cpp itself when installed): llama.cpp's rows on an f16 file of
# each tokenizer kind (Llama 3's tiktoken vocabulary, Llama 2's and Code Llama's sentencepiece) and on a q8_0
# file; the others are judged quick (a 128k-vocabulary outputs run per file would repeat the same rules)
FULL = {("llama2-chat", "f16"), ("llama3.1-instruct", "f16"), ("llama2-13b-mp2", "q8_0"), ("codellama", "f16")}


@pytest.mark.parametrize("case,outtype", [(c, t) for c, (_, _, ts) in CASES.items() for t in ts])
def test_llamacpp_gguf_passes(ggufs, case, outtype):
    """Bug class: a judge that fails honest GGUFs (llama.cpp's own converter, f16/bf16/q8_0) of any family:
    sentencepiece and tiktoken vocabularies, GQA, tied output, RoPE factors 8 and 32, MP shards; or, with
    llama.cpp installed, llama.cpp's own encoding and logits of an honest f16 / q8_0 file judged wrong."""
    meta, files = ggufs[case]
    full = (case, outtype) in FULL
    rep = verify_gguf(meta, files[outtype], checks="all" if full else "quick")
    assert rep.ok, rep.render()
    names = [n for n, *_ in rep.rows()]
    if full and HAS_RUNTIME:
        assert RUNTIME_LOGITS in names, names
        assert all(any(n.startswith(r) for n in names) for r in (RUNTIME_TOKENS, RUNTIME_SPECIAL)), names


def _permute_q_half_split(gf):
    t = gf.tensors["blk.0.attn_q.weight"]
    hd = int(gf.key("rope.dimension_count"))
    perm = [h * hd + 2 * j + half for h in range(t.shape[0] // hd) for half in (0, 1) for j in range(hd // 2)]
    return {"tensors": {t.name: np.asarray(t.data)[perm]}}


def _swap_kv_heads(gf):
    t = gf.tensors["blk.1.attn_k.weight"]
    hd = int(gf.key("rope.dimension_count"))
    data = np.asarray(t.data).copy()
    data[:hd], data[hd:2 * hd] = np.asarray(t.data)[hd:2 * hd], np.asarray(t.data)[:hd]
    return {"tensors": {t.name: data}}


def _rope_factor(gf, factor):
    from llama_parity.gguf_judge.meta_checks import expected_rope_factors  # noqa: F401 - the judge's formula

    t = gf.tensors["rope_freqs.weight"]
    f = np.asarray(t.data).view(np.float32).copy()
    f[f > 1] = np.where(f[f > 1] == f.max(), factor, f[f > 1])
    return {"tensors": {t.name: f.view(np.uint8).reshape(t.data.shape)}}


# name -> (case, outtype, edit of the read file -> write_gguf kwargs, the check that must fail)
MUTATIONS = {
    "instruct eos <|end_of_text|>": ("llama3.1-instruct", "f16",
                                     lambda gf: {"fields": {"tokenizer.ggml.eos_token_id": 128001}},
                                     "tokenizer: special token ids"),
    "pre-tokenizer not llama-bpe": ("llama3.1-instruct", "f16",
                                    lambda gf: {"fields": {"tokenizer.ggml.pre": "default"}},
                                    "tokenizer: tokenizer model and pre-tokenizer"),
    "rope_freqs missing": ("llama3.1-instruct", "f16", lambda gf: {"drop_tensors": ["rope_freqs.weight"]},
                           "gguf: rope_freqs"),
    "rope factor 32 on 3.1": ("llama3.1-instruct", "f16", lambda gf: _rope_factor(gf, 32.0), "gguf: rope_freqs"),
    "rope factor 8 on 3.2": ("llama3.2-tied", "bf16", lambda gf: _rope_factor(gf, 8.0), "gguf: rope_freqs"),
    "q rows in half-split layout": ("llama2-13b-mp2", "q8_0", _permute_q_half_split, "gguf weights: Q8_0"),
    "kv heads swapped": ("llama3.1-instruct", "f16", _swap_kv_heads, "gguf weights: F32/F16/BF16"),
    "embedding rows shifted": ("llama2-chat", "f16", lambda gf: {"tensors": {"token_embd.weight": np.roll(
        np.asarray(gf.tensors["token_embd.weight"].data), 1, axis=0)}}, "gguf weights: F32/F16/BF16"),
    "vocabulary shifted": ("llama3.1-instruct", "f16", lambda gf: {"fields": {"tokenizer.ggml.tokens": (
        lambda t: t[1:] + t[:1])(gf.get("tokenizer.ggml.tokens"))}}, "tokenizer: every token's bytes"),
    "chat template dropped": ("llama3.1-instruct", "f16", lambda gf: {"drop_fields": ["tokenizer.chat_template"]},
                              "tokenizer: chat template present"),
    "scores -1000 (no tokenizer.model)": ("llama2-chat", "f16", lambda gf: {"fields": {"tokenizer.ggml.scores": [
        -1000.0] * len(gf.get("tokenizer.ggml.scores"))}}, "tokenizer: sentencepiece scores"),
    "output matrix dropped": ("llama3.1-instruct", "f16", lambda gf: {"drop_tensors": ["output.weight"]},
                              "gguf: separate output matrix"),
    "context length 8192 on 3.1": ("llama3.1-instruct", "f16",
                                   lambda gf: {"fields": {"llama.context_length": 8192}}, "gguf: llama.context_length"),
    "file type says q8_0": ("llama2-chat", "f16", lambda gf: {"fields": {"general.file_type": 7}},
                            "gguf: general.file_type"),
    # the other families' own traits
    "Llama 3.3 given Llama 3's chat template": ("llama3.3-instruct", "f16", lambda gf: {"fields": {
        "tokenizer.chat_template": _read(gf.path.parent / "llama3-instruct-f16.gguf").get("tokenizer.chat_template")}},
        "tokenizer: chat template == official template"),
    "Llama 3 instruct eos <|end_of_text|>": ("llama3-instruct", "f16", lambda gf: {"fields": {
        "tokenizer.ggml.eos_token_id": 128001}}, "tokenizer: special token ids"),
    "Llama 3 given 3.1's 128k context": ("llama3-instruct", "f16", lambda gf: {"fields": {
        "llama.context_length": 131072}}, "gguf: llama.context_length"),
    "Code Llama rope_theta 1e4": ("codellama", "f16", lambda gf: {"fields": {"llama.rope.freq_base": 10000.0}},
                                  "gguf: llama.rope.freq_base"),
    "Code Llama eot key dropped": ("codellama", "f16", lambda gf: {"drop_fields": ["tokenizer.ggml.eot_token_id"]},
                                   "tokenizer: special token ids"),
    "Llama Guard 3 chat template dropped": ("guard3-1b", "f16", lambda gf: {"drop_fields": [
        "tokenizer.chat_template"]}, "tokenizer: chat template present"),
    "Llama 1 norm eps 1e-5": ("llama1", "f16", lambda gf: {"fields": {
        "llama.attention.layer_norm_rms_epsilon": 1e-5}}, "gguf: llama.attention.layer_norm_rms_epsilon"),
    "Llama 1 given Llama 2's 4k context": ("llama1", "f16", lambda gf: {"fields": {"llama.context_length": 4096}},
                                           "gguf: llama.context_length"),
}


_READ = {}


def _read(path):
    """Each honest file read once (its 128k-token header parsed once) for all its mutants."""
    if path not in _READ:
        _READ[path] = read_gguf(path)
    return _READ[path]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_gguf_mutation_fails_named_check(ggufs, tmp_path, mutation):
    """Bug classes: the GGUF release bugs (instruct eos, pre-tokenizer, missing or wrong RoPE factors, q/k rows
    in another rotary layout) and misplaced heads/rows, a shifted vocabulary, a dropped chat template or
    output matrix, -1000 scores, a wrong context length or file type: each fails the check naming it."""
    case, outtype, edit, check = MUTATIONS[mutation]
    meta, files = ggufs[case]
    gf = _read(files[outtype])
    bad = write_gguf(gf, tmp_path / "mutant.gguf", **edit(gf))
    # the cheapest run holding the named check: the weights only for a weights check
    rep = verify_gguf(meta, bad, checks="quick" if check.startswith("gguf weights") else "metadata")
    failed = [n for n, _, _, ok in rep.rows() if not ok]
    assert any(n.startswith(check) for n in failed), (mutation, failed, rep.render())


def test_unedited_rewrite_is_byte_identical(ggufs, tmp_path):
    """Bug class: the mutants' writer (gguf_judge.mutate.write_gguf) changing bytes besides its edit (a
    tensor's offset, padding or alignment, a value re-encoded), so that a mutant fails for another reason
    than the one its test names: rewritten without edits, an f16 and a q8_0 file of llama.cpp's come back
    byte for byte."""
    for case, outtype in (("llama1", "f16"), ("llama2-13b-mp2", "q8_0")):
        src = ggufs[case][1][outtype]
        out = write_gguf(read_gguf(src), tmp_path / f"{case}.gguf")
        assert out.read_bytes() == src.read_bytes(), (case, outtype)


def test_spm_conversion_ships_tokenizer_model(ggufs):
    """Bug class: our Llama 2 folder without tokenizer.model, so llama.cpp scores every piece -1000 and
    splits ordinary words unlike Meta (the shipped file is Meta's, byte for byte)."""
    meta, files = ggufs["llama2-chat"]
    hf = files["f16"].parent / "llama2-chat-hf"
    assert (hf / "tokenizer.model").read_bytes() == real_llama2_tokenizer().read_bytes()
    scores = read_gguf(files["f16"]).get("tokenizer.ggml.scores")
    assert len(set(scores)) > 1000


def test_reader_agrees_with_the_gguf_package(ggufs):
    """Bug class: our GGUF header parser (formats/gguf.py) misreading a file llama.cpp wrote: a value of the
    wrong type or length, dims in the wrong order, a tensor's data offset or alignment off (bytes of the
    neighbouring tensor): every key's value and every tensor's type, shape and stored bytes must equal what
    the gguf package's own GGUFReader (llama.cpp's) reads."""
    import gguf

    path = ggufs["llama1"][1]["f16"]  # F16 and F32 tensors, a 624-piece vocabulary (gguf reads it fast)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for k, f in fields.items():
        want = f.contents()
        got = ours.get(k)
        assert (got == pytest.approx(want) if isinstance(want, float) else got == want), k
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        o = ours.tensors[t.name]
        assert (o.type_name, o.shape) == (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))), t.name
        assert o.raw_rows().tobytes() == np.asarray(t.data).tobytes(), t.name


_MAPPING = __import__("re").compile(r"[0-9a-f]+-[0-9a-f]+ ")


def _resident(paths) -> dict[tuple[str, str], int]:
    """(file, address range) -> resident bytes, for this process's mappings of `paths` (/proc/self/smaps)."""
    real = {str(p.resolve()): str(p) for p in paths}
    out, current = {}, None
    with open("/proc/self/smaps") as f:
        for ln in f:
            head = ln.split()
            if _MAPPING.match(ln):  # a mapping's first line (anonymous ones have no path)
                current = (real[" ".join(head[5:])], head[0]) if " ".join(head[5:]) in real else None
            elif current is not None and ln.startswith("Rss:"):
                out[current] = int(head[1]) * 1024
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_judge_keeps_no_file_pages_resident(ggufs, monkeypatch):
    """Bug class: the judge reading the GGUF or Meta's shards through a memory map (np.memmap, gguf's
    GGUFReader, torch.load(mmap=True) tensors): mapped pages count in RSS for as long as the map lives, so an
    8B f16 file made the judge's peak RSS 23-24 GB. While every weight is compared and every layer is built
    for the outputs run, the judge may not map the GGUF at all, and may keep at most a quarter of a Meta
    shard resident through a mapping it made (torch.load maps a shard for its keys and shapes: the pickle's
    pages, not the tensors')."""
    from llama_parity.gguf_judge import outputs, weights

    meta, files = ggufs["llama2-chat"]
    path, seen = files["f16"], []
    shards = sorted(meta.glob("consolidated.*.pth"))
    before = set(_resident([path, *shards]))  # other code's mappings (the fixture's conversion) left aside
    compare, layer = weights.compare_tensor, outputs._Weights.layer

    def look(what):
        new = {k: v for k, v in _resident([path, *shards]).items() if k not in before}
        if any(f == str(path) or v > Path(f).stat().st_size // 4 for (f, _), v in new.items()):
            seen.append((what, new))

    def compare_and_look(t, *a, **k):
        compare(t, *a, **k)
        look(t.name)

    def layer_and_look(self, i):
        out = layer(self, i)
        look(f"layer {i} ({self.variant})")
        return out

    monkeypatch.setattr(weights, "compare_tensor", compare_and_look)
    monkeypatch.setattr(outputs._Weights, "layer", layer_and_look)
    rep = verify_gguf(meta, path, checks="quick")
    assert rep.ok, rep.render()
    outputs.run_all(read_gguf(path), *_meta_and_expected(meta), [([1, 2, 3], torch.arange(3))], None,
                    ("meta", "gguf"))
    look("after the outputs run")
    assert not seen, seen[:3]


def _meta_and_expected(meta_dir):
    """(meta side, expected values) as verify_gguf builds them, for a direct outputs run."""
    from llama_parity.gguf_judge.meta_checks import expected_from
    from llama_parity.gguf_judge.names import with_pread
    from llama_parity.metadata import read_meta_side
    from llama_parity.parity import expected_rope_scaling

    m = with_pread(read_meta_side(meta_dir), meta_dir)
    return m, expected_from(m, None, expected_rope_scaling(meta_dir, None))


_RSS_CHILD = """
import sys
from llama_parity.gguf_judge import read_gguf

def hwm():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024

gf = read_gguf(sys.argv[1])
before = hwm()
largest = 0
for t in gf.tensors.values():
    largest = max(largest, t.raw_rows().nbytes)
    for a in range(0, t.shape[0] if len(t.shape) == 2 else 1, 4096):
        int(t.raw_rows(a, a + 4096).sum(dtype="uint64"))  # every byte read, 4096 rows at a time
print(hwm() - before, largest)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc/self/status")
def test_reading_every_tensor_keeps_rss_bounded(ggufs):
    """Bug class: a GGUF reader whose reads stay resident (a memory map: touched pages count in RSS until
    unmapped; or a whole-file read): reading every byte of a 74 MB file tensor by tensor must raise the
    process's peak RSS (VmHWM, in a fresh child) by at most the largest tensor plus 8 MB, not the file."""
    import subprocess
    import sys

    path = ggufs["llama3.1-instruct"][1]["f16"]
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True, check=True)
    growth, largest = (int(x) for x in r.stdout.split())
    size = path.stat().st_size
    assert largest < size / 2, (largest, size)  # the bound below must stand apart from the file size
    assert growth <= largest + (8 << 20), f"peak RSS grew {growth / 2**20:.1f} MB reading a {size / 2**20:.1f} MB " \
        f"file whose largest tensor is {largest / 2**20:.1f} MB"


@pytest.mark.parametrize("content", [b"not a gguf file", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_cli_bad_gguf_is_exit_2(ggufs, tmp_path, content, capsys):
    """Bug class: a foreign or truncated file judged as a parity failure or crashing with a traceback,
    instead of one line naming the file and exit 2."""
    from llama_parity.cli import main

    meta, _ = ggufs["llama2-chat"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert main(["verify", "--meta-dir", str(meta), "--gguf", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-parity: ") and "bad.gguf" in err[0], err


def test_cli_gguf_report_exit_codes(ggufs, tmp_path, capsys):
    """Bug class: verify --gguf exiting 0 on a failed GGUF (scripts and CI gate on the exit code), the JSON
    report missing the verdict, or the HTML report missing the GGUF's checks."""
    import json

    from llama_parity.cli import main

    meta, files = ggufs["llama2-chat"]
    gf = read_gguf(files["f16"])
    bad = write_gguf(gf, tmp_path / "bad.gguf", fields={"tokenizer.ggml.bos_token_id": 2})
    assert main(["verify", "--meta-dir", str(meta), "--gguf", str(files["f16"]), "--metadata-only",
                 "--html", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "gguf: llama.rope.freq_base" in html and "special token ids" in html, html[:2000]
    assert main(["verify", "--meta-dir", str(meta), "--gguf", str(bad), "--metadata-only",
                 "--json", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


def test_several_outputs_one_report(ggufs, tmp_path, capsys):
    """Bug class: several outputs of one checkpoint (an HF folder and GGUF files) judged in one run where a
    failing output is hidden by the others (exit 0, or one JSON verdict for the last output only)."""
    import json

    from llama_parity.cli import main

    meta, files = ggufs["llama2-chat"]
    hf = files["f16"].parent / "llama2-chat-hf"
    bad = write_gguf(_read(files["f16"]), tmp_path / "bad.gguf", fields={"tokenizer.ggml.bos_token_id": 2})
    base = ["verify", "--meta-dir", str(meta), "--hf-dir", str(hf), "--gguf", str(files["f16"]), "--metadata-only",
            "--no-tokenizer"]  # (the HF folder's tokenizer check is test_tokenizer_*'s; the GGUF's is proven)
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "=== output 1/2: HF folder" in out and "=== output 2/2: GGUF file" in out and "ALL 2 OUTPUTS OK" in out
    assert main(base + ["--gguf", str(bad), "--json", str(tmp_path / "r.json")]) == 1
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["ok"] is False and [o["ok"] for o in rep["outputs"]] == [True, True, False], rep["verdict"]
    assert [o["kind"] for o in rep["outputs"]] == ["hf", "gguf", "gguf"]
    assert rep["outputs"][2]["report"]["ok"] is False and "bad.gguf" in rep["verdict"]


def test_several_outputs_refuse_one_output_options(ggufs, capsys):
    """Bug class: an option that describes one output (--html, --attestation, --nproc) silently applied to
    only one of several outputs, or a traceback, instead of one line and exit 2."""
    from llama_parity.cli import main

    meta, files = ggufs["llama2-chat"]
    argv = ["verify", "--meta-dir", str(meta), "--gguf", str(files["f16"]), "--gguf", str(files["f16"])]
    assert main(argv + ["--html", "r.html"]) == 2
    assert main(argv) == 2  # the same output twice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("llama-parity: ") for e in err), err
    assert "--html" in err[0] and "twice" in err[1], err


def _runtime_note(ggufs, monkeypatch, available: bool, child: list[str] | None = None):
    from llama_parity.gguf_judge import _runtime, runtime
    from llama_parity.verify import VerifyReport

    meta, files = ggufs["llama2-chat"]
    monkeypatch.setattr(runtime, "available", lambda: available)
    if child:
        monkeypatch.setattr(runtime, "CHILD", child)
    rep = VerifyReport(str(meta), str(files["f16"]), "cpu")
    assert _runtime(rep, _read(files["f16"]), None, None, [1, 2, 3]) is None
    assert not rep.checks and len(rep.notes) == 1 and rep.ok
    return rep.notes[0]


def test_runtime_absent_is_said_not_passed(ggufs, monkeypatch):
    """Bug class: verify --gguf without llama-cpp-python silently reporting the file as judged by llama.cpp
    (or failing it) instead of one report line saying llama.cpp's rows were not run, with the install hint."""
    note = _runtime_note(ggufs, monkeypatch, available=False)
    assert "NOT judged" in note and "pip install 'llama-parity[gguf-runtime]'" in note, note


def test_runtime_crash_is_the_runtimes(ggufs, monkeypatch):
    """Bug class: llama.cpp crashing on a file (0.3.36 segfaults on q8_0 with AMX/repack buffers) taking the
    judge down or reported as the file's parity failure, instead of the runtime's (file, types, signal)."""
    import sys

    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    note = _runtime_note(ggufs, monkeypatch, available=True, child=crash)
    assert "killed by SIGSEGV" in note and "llama2-chat-f16.gguf" in note and "F16" in note, note
    assert "not a verdict on the file" in note, note


# name -> (case, write_gguf kwargs, the rows that must fail and no other): what llama.cpp reads that the judge's
# own reader does not, or reads otherwise
RUNTIME_MUTATIONS = {
    # no rope.scaling.type: llama.cpp takes "linear" and divides every position by the factor
    "rope scaling factor 4 (llama.cpp: linear)": ("llama2-chat", {
        "fields": {"llama.rope.scaling.factor": 4.0}, "types": {"llama.rope.scaling.factor": (6, None)}},
        ("llama.cpp: ",)),
    # sentencepiece's dummy prefix turned off: " jumps" and "jumps" become the same tokens
    "add_space_prefix false": ("llama2-chat", {"fields": {"tokenizer.ggml.add_space_prefix": False},
                                               "types": {"tokenizer.ggml.add_space_prefix": (7, None)}},
                               (RUNTIME_TOKENS,)),
    # llama.cpp does not find ▁<EOT> by name: its end-of-generation set loses it, an infill never stops
    "Code Llama eot key dropped": ("codellama", {"drop_fields": ["tokenizer.ggml.eot_token_id"]},
                                   ("tokenizer: special token ids", RUNTIME_SPECIAL)),
}


@needs_runtime
@pytest.mark.parametrize("mutation", list(RUNTIME_MUTATIONS))
def test_runtime_sees_what_the_reader_does_not(ggufs, tmp_path, mutation):
    """Bug class: a GGUF key llama.cpp obeys but the judge's reader ignores (a RoPE scaling factor without a
    type, the sentencepiece space prefix) or a special token llama.cpp resolves otherwise than Meta (Code
    Llama's eot): llama.cpp's own row must fail, and nothing but the rows named."""
    case, edit, checks = RUNTIME_MUTATIONS[mutation]
    meta, files = ggufs[case]
    bad = write_gguf(_read(files["f16"]), tmp_path / "mutant.gguf", **edit)
    rep = verify_gguf(meta, bad, checks="all")
    failed = [n for n, _, _, ok in rep.rows() if not ok]
    assert failed and all(any(n.startswith(c) for c in checks) for n in failed), (mutation, failed, rep.render())
    assert all(any(n.startswith(c) for n in failed) for c in checks), (mutation, failed)


# llama.h's enum llama_ftype: the k-quant most GGUFs ship, and the legacy block types (deterministic rounding)
QUANTS = {"Q4_K_M": 15, "IQ4_XS": 30, "IQ4_NL": 25, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}


@pytest.fixture(scope="module")
def quants(tmp_path_factory):
    """(meta folder, {type: file}): a Llama 2 checkpoint whose rows hold 256 values (a k-quant super-block;
    the usual tiny rows of 64 would make llama.cpp fall back to other types) and a tiny sentencepiece
    vocabulary, converted by us, by llama.cpp's converter to f16, then quantised to each type by llama.cpp's
    own llama_model_quantize (llama-quantize's code), all in one child process."""
    from llama_parity.fixtures import factory
    from llama_parity.gguf_judge import runtime

    root = tmp_path_factory.mktemp("quants")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(factory, "HEAD_DIM", 64)  # 4 heads of 64: dim 256
        meta = make_tiny_checkpoint(get("llama2-7b"), root, dtype=torch.bfloat16)
    convert_meta_to_hf(meta, root / "llama2-256-hf")
    convert_to_gguf([(root / "llama2-256-hf", "f16", root / "f16.gguf")])
    files = {name: root / f"{name.lower()}.gguf" for name in QUANTS}
    why = runtime.quantize(root / "f16.gguf", [(files[n], f) for n, f in QUANTS.items()])
    assert why is None, why
    return meta, files


def _swap_rows(gf, tmp_path, type_name: str):
    """The file with rows 3 and 40 of blk.1.attn_q swapped (a misplaced row inside a quantised tensor)."""
    t = gf.tensors["blk.1.attn_q.weight"]
    assert t.type_name == type_name, t.type_name
    data = np.asarray(t.data).copy()
    data[[3, 40]] = data[[40, 3]]
    return write_gguf(gf, tmp_path / "bad.gguf", tensors={t.name: data})


@needs_runtime
@pytest.mark.parametrize("ftype,qtype", [("Q4_K_M", "Q4_K"), ("IQ4_XS", "IQ4_XS"), ("IQ4_NL", "IQ4_NL")])
def test_kquant_passes_and_misplaced_row_fails(quants, tmp_path, ftype, qtype):
    """Bug classes: an honest k-quant or i-quant (llama.cpp's Q4_K_M, IQ4_XS, IQ4_NL through its quantize API:
    the i-quants that need no importance matrix) failed by the judge, or its llama.cpp logits judged wrong; a
    row misplaced inside such a tensor passing the per-block bound; llama.cpp's rows on such a file unable to
    fail (a RoPE scaling factor without a type, which llama.cpp applies as linear scaling, must fail them)."""
    meta, files = quants
    gf = read_gguf(files[ftype])
    rep = verify_gguf(meta, files[ftype], checks="all")
    assert rep.ok, rep.render()
    names = [n for n, *_ in rep.rows()]
    assert any(n.startswith(f"gguf weights: {qtype} (block RMS") for n in names), names
    assert RUNTIME_LOGITS in names, names
    failed = [n for n, _, _, ok in verify_gguf(meta, _swap_rows(gf, tmp_path, qtype), checks="quick").rows()
              if not ok]
    assert failed and all(n.startswith(f"gguf weights: {qtype}") for n in failed), failed
    if qtype.startswith("IQ"):
        bad = write_gguf(gf, tmp_path / "linear.gguf", fields={"llama.rope.scaling.factor": 4.0},
                         types={"llama.rope.scaling.factor": (6, None)})
        failed = [n for n, _, _, ok in verify_gguf(meta, bad, checks="all").rows() if not ok]
        assert RUNTIME_LOGITS in failed and all(n.startswith("llama.cpp: ") for n in failed), failed


@needs_runtime
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_quant_passes_and_misplaced_row_fails(quants, tmp_path, qtype):
    """Bug classes: an honest legacy block quantisation by llama.cpp (its C rounding may differ from gguf's
    reference code on ties) failed by the half-step rule, or by the outputs bound (its Q6_K output matrix
    makes the honest run noisy: without noise on the legacy layers too, llama.cpp's own Q4_0 failed by 1%);
    or a row misplaced inside such a tensor passing."""
    meta, files = quants
    gf = read_gguf(files[qtype])
    rep = verify_gguf(meta, files[qtype], checks="all")
    assert rep.ok, rep.render()
    assert any(n.startswith(f"gguf weights: {qtype} (half a step") for n, *_ in rep.rows()), rep.render()
    failed = [n for n, _, _, ok in verify_gguf(meta, _swap_rows(gf, tmp_path, qtype), checks="quick").rows()
              if not ok]
    assert failed and all(n.startswith(f"gguf weights: {qtype}") for n in failed), failed

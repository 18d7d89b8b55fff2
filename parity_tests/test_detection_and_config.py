"""Detection and config.json on REAL shapes, without real weights.

A `ShapeOnlyCheckpoint` has every release's real params.json and tensor shapes but no data (its
tensors are constant, broadcast views costing no memory), so detection and the written configs
are tested for all 33 releases: 405B included, in seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llama_parity.converter import hf_config
from llama_parity.converter.detect import detect
from llama_parity.converter.plan import build_plan
from llama_parity import releases as registry
from llama_parity.releases import FAMILY_FACTS, VARIANTS, intermediate_size

# Where our output deliberately differs from the official HF file, and why.
KNOWN_DEVIATIONS = {
    # The official Llama-Guard-3-1B config carries factor 8 (transformers' script hard-codes 8 for
    # "Guard-3"), but the model is a Llama 3.2 1B fine-tune trained with factor 32: we write 32.
    ("llama-guard-3-1b", "rope_scaling.factor"): 32.0,
    # Llama Guard 3 8B's params.json says use_scaled_rope false (Meta's llama-models sku_list), so
    # Meta's reference runs it unscaled; the HF config is believed to carry 3.1 scaling (what
    # transformers' script writes for "Guard-3"). We follow the Meta files: no scaling.
    ("llama-guard-3-8b", "rope_scaling"): None,
}
_NO_DEVIATION = object()


class ShapeOnlyCheckpoint:
    """Duck-types MetaCheckpoint: real names and shapes, constant data."""

    def __init__(self, spec, directory: Path):
        p = spec.params
        self.dir, self.params, self.num_shards = directory, dict(p), spec.num_shards
        n = self.num_shards
        dim, heads = p["dim"], p["n_heads"]
        kv = p.get("n_kv_heads") or heads
        hd = dim // heads
        ffn = intermediate_size(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        self.rep = (kv // spec.hf_num_kv_heads) if spec.hf_num_kv_heads else 1
        emb_dim = FAMILY_FACTS[spec.family].embedding_shard_dim
        vocab = spec.vocab_size
        self.shapes = {"tok_embeddings.weight": (vocab // n, dim) if emb_dim == 0 else (vocab, dim // n),
                       "norm.weight": (dim,), "output.weight": (vocab // n, dim)}
        for i in range(p["n_layers"]):
            self.shapes.update({
                f"layers.{i}.attention.wq.weight": (heads * hd // n, dim),
                f"layers.{i}.attention.wk.weight": (kv * hd // n, dim),
                f"layers.{i}.attention.wv.weight": (kv * hd // n, dim),
                f"layers.{i}.attention.wo.weight": (dim, heads * hd // n),
                f"layers.{i}.feed_forward.w1.weight": (ffn // n, dim),
                f"layers.{i}.feed_forward.w2.weight": (dim, ffn // n),
                f"layers.{i}.feed_forward.w3.weight": (ffn // n, dim),
                f"layers.{i}.attention_norm.weight": (dim,),
                f"layers.{i}.ffn_norm.weight": (dim,)})
        self.tied = spec.tie_word_embeddings
        self.tokenizer_path = None
        self.tokenizer_kind = FAMILY_FACTS[spec.family].tokenizer
        self.shard_paths = [directory / f"consolidated.{s:02d}.pth" for s in range(n)]
        self.hd = hd

    def has(self, key):
        return key in self.shapes

    def keys(self, shard=0):
        return list(self.shapes)

    def info(self, key, shard=0):
        from llama_parity.converter.meta_checkpoint import TensorInfo

        return TensorInfo(self.shapes[key], torch.bfloat16)

    def tensors_equal(self, key_a, key_b, shard):
        return torch.equal(self.tensor(key_a, shard), self.tensor(key_b, shard))

    def tensor(self, key, shard):
        shape = self.shapes[key]
        if key.endswith(("wk.weight", "wv.weight")):
            # every stored kv head gets its real head's number: replicas equal, distinct heads differ
            local = shape[0] // self.hd
            real = (shard * local + torch.arange(local)) // self.rep
            return real.to(torch.bfloat16).repeat_interleave(self.hd)[:, None].expand(shape)
        value = 1.0 if key == "tok_embeddings.weight" or (key == "output.weight" and self.tied) else 2.0
        return torch.full((), value, dtype=torch.bfloat16).expand(shape)


@pytest.fixture
def shape_only(tmp_path, monkeypatch):
    """Build a ShapeOnlyCheckpoint; its (absent) tokenizer reports the release's real size."""
    def make(spec) -> ShapeOnlyCheckpoint:
        d = tmp_path / spec.meta_dir_name
        d.mkdir(parents=True, exist_ok=True)
        ckpt = ShapeOnlyCheckpoint(spec, d)
        ckpt.tokenizer_path = d / "tokenizer.model"
        monkeypatch.setattr("llama_parity.converter.detect.tokenizer_n_words", lambda path, kind: spec.vocab_size)
        return ckpt
    return make


@pytest.mark.parametrize("spec", VARIANTS, ids=[v.id for v in VARIANTS])
def test_detects_every_release(spec, shape_only):
    """Bug class: a release mistaken for another (3.2 1B for Guard 3 1B, 3.1 for 3.2, base for
    instruct, MP16 for MP8), which silently changes rope scaling, tying or eos ids."""
    v = detect(shape_only(spec))
    assert v.registry_id == spec.id, v.evidence
    assert v.family == spec.family
    assert v.tie_word_embeddings == spec.tie_word_embeddings
    assert (v.rope_scaling.factor if v.rope_scaling else None) == (spec.rope_scaling.factor if spec.rope_scaling else None)
    assert v.hf_num_kv_heads == (spec.hf_num_kv_heads or spec.params.get("n_kv_heads") or spec.params["n_heads"])


def _compare(ours: dict, official: dict, variant_id: str, what: str):
    problems = []
    for key in sorted(set(ours) | set(official)):
        if key in hf_config.STAMP_KEYS:
            continue
        a, b = ours.get(key, "<absent>"), official.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            for k2 in sorted(set(a) | set(b)):
                dev = KNOWN_DEVIATIONS.get((variant_id, f"{key}.{k2}"))
                if a.get(k2) != b.get(k2) and not (dev is not None and a.get(k2) == dev):
                    problems.append(f"{what} {key}.{k2}: ours {a.get(k2)!r} official {b.get(k2)!r}")
        elif KNOWN_DEVIATIONS.get((variant_id, key), _NO_DEVIATION) == a and a != b:
            continue
        elif a != b or type(a) is not type(b):
            problems.append(f"{what} {key}: ours {a!r} official {b!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("spec", VARIANTS, ids=[v.id for v in VARIANTS])
def test_config_matches_official(spec, shape_only):
    """Bug class: config.json values that differ from Meta's official HF repo (rope scaling, eos
    list, max_position_embeddings, tie_word_embeddings, head_dim, kv heads, theta as int/float)."""
    v = detect(shape_only(spec), variant_id=spec.id)
    official_id = spec.id.replace("-mp16", "")
    _compare(hf_config.build_config(v, torch.bfloat16), hf_config.official_file(official_id, "config.json"),
             spec.id, "config.json")
    _compare(hf_config.build_generation_config(v), hf_config.official_file(official_id, "generation_config.json"),
             spec.id, "generation_config.json")


@pytest.mark.parametrize("spec", [v for v in VARIANTS if v.num_shards > 1 or v.tie_word_embeddings],
                         ids=lambda v: v.id)
def test_plan_has_real_shapes(spec, shape_only):
    """Bug class: merged shapes that are not HF's (embedding merged on the wrong dim, kv heads
    not de-duplicated, lm_head written for a tied model)."""
    ckpt = shape_only(spec)
    v = detect(ckpt, variant_id=spec.id)
    plan = {e.hf_name: e.shape for e in build_plan(v, ckpt)}
    p = spec.params
    dim, heads = p["dim"], p["n_heads"]
    kv = spec.hf_num_kv_heads or p.get("n_kv_heads") or heads
    hd = dim // heads
    assert plan["model.embed_tokens.weight"] == (spec.vocab_size, dim)
    assert plan["model.layers.0.self_attn.k_proj.weight"] == (kv * hd, dim)
    assert plan["model.layers.0.self_attn.o_proj.weight"] == (dim, dim)
    assert ("lm_head.weight" in plan) == (not spec.tie_word_embeddings)


@pytest.mark.parametrize("variant_id", [v.id for v in registry.architecture_variants()])
def test_tiny_checkpoints_detected(tiny, variant_id):
    """Bug class: detection that only works on real shapes (fine-tunes, custom sizes): the tiny
    checkpoint, named like Meta's download folder, must resolve to its release's facts."""
    from llama_parity.converter.convert import inspect

    spec = registry.get(variant_id)
    v, _plan = inspect(tiny.meta(variant_id))
    assert v.family == spec.family
    assert v.registry_id == spec.id
    assert v.tie_word_embeddings == spec.tie_word_embeddings
    assert v.rope_scaling == spec.rope_scaling
    assert v.kv_replication == (2 if variant_id.endswith("mp16") else 1)


def test_official_files_are_recorded_for_every_release():
    """Bug class: a release added to the registry without its official facts (config untested)."""
    for spec in VARIANTS:
        for name in ("config.json", "generation_config.json"):
            assert hf_config.official_file(spec.id.replace("-mp16", ""), name), (spec.id, name)


def test_written_config_loads_in_transformers(tiny):
    """Bug class: a config.json transformers cannot read back as the same rope setup."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tiny.hf("llama3.2-1b")))
    raw = json.loads((tiny.hf("llama3.2-1b") / "config.json").read_text())
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert raw["rope_scaling"]["factor"] == 32.0 and "rope_parameters" not in raw
    assert cfg.tie_word_embeddings is True


@pytest.mark.parametrize("variant_id", ["llama3.1-8b", "llama3.3-70b-instruct", "llama3.2-1b", "llama-guard-3-8b",
                                        "llama3-8b", "llama2-7b", "codellama-7b"])
def test_generation_config_ids_name_the_right_tokens(tiny, variant_id):
    """Bug class: eos/bos ids in config.json or generation_config.json that point at the wrong
    token of the converted tokenizer (ids copied from the real vocabulary onto another one,
    <|eot_id|> missing from an instruct model's stop list)."""
    hf = tiny.hf(variant_id)
    tok = json.loads((hf / "tokenizer.json").read_text())
    names = {t["id"]: t["content"] for t in tok["added_tokens"]}
    official = hf_config.official_file(variant_id, "generation_config.json")
    real_names = {1: "<s>", 2: "</s>", 0: "<unk>", 128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                  128008: "<|eom_id|>", 128009: "<|eot_id|>"}
    for fname in ("config.json", "generation_config.json"):
        ours = json.loads((hf / fname).read_text())
        off = hf_config.official_file(variant_id, fname)
        for key in ("bos_token_id", "eos_token_id"):
            want = off.get(key)
            got = ours.get(key)
            want_l = want if isinstance(want, list) else [want]
            got_l = got if isinstance(got, list) else [got]
            assert [names.get(i) for i in got_l] == [real_names[i] for i in want_l], (fname, key, got, want)
    assert official  # recorded


# --- real-world files whose values differ from the registry's params.json -------------------------

def _with_params(ckpt, **changes):
    ckpt.params.update(changes)
    return ckpt


def _renamed(shape_only, spec, folder: str):
    ckpt = shape_only(spec)
    d = ckpt.dir.parent / folder
    d.mkdir(parents=True, exist_ok=True)
    ckpt.dir = d
    return ckpt


def test_first_llama2_7b_chat_download_with_norm_eps_1e6(shape_only):
    """Bug class: detection by raw params equality: the first Llama 2 7B chat download said
    norm_eps 1e-06 (fixed later); it must still be Llama 2 7B chat, computing with the file's eps."""
    v = detect(_with_params(shape_only(registry.get("llama2-7b-chat")), norm_eps=1e-06))
    assert v.registry_id == "llama2-7b-chat" and v.family == "llama2"
    assert v.norm_eps == 1e-06
    assert v.max_position_embeddings == 4096
    assert any("norm_eps" in e for e in v.evidence), v.evidence


@pytest.mark.parametrize("multiple_of", [1024, 4096])
def test_llama3_70b_multiple_of_quoted_both_ways(shape_only, multiple_of):
    """Bug class: a release missed because params.json quotes another multiple_of that gives the
    same FFN size after Meta's rounding (Llama 3 70B: 4096 and 1024 both give 28672)."""
    v = detect(_with_params(shape_only(registry.get("llama3-70b")), multiple_of=multiple_of))
    assert v.registry_id == "llama3-70b"
    assert v.intermediate_size == 28672


@pytest.mark.parametrize("folder,want", [("7B", "llama1-7b"), ("llama-7b", "llama1-7b"), ("llama-2-7b", "llama2-7b"),
                                         ("Llama-2-7b-hf", "llama2-7b"), ("llama_2_7b_chat", "llama2-7b-chat")])
def test_llama1_vs_llama2_7b_decided_by_folder_name(shape_only, folder, want):
    """Bug class: Llama 1 7B and Llama 2 7B have the same architecture (and the early Llama 2 chat
    the same eps): guessing one silently changes the context length and chat template."""
    spec = registry.get("llama1-7b")
    v = detect(_renamed(shape_only, spec, folder))
    assert v.registry_id == want, v.evidence


def test_llama1_vs_llama2_7b_without_folder_name_requires_variant(shape_only):
    """Bug class: an ambiguous params.json resolved by a guess; the error must name the candidates
    and the flag that decides."""
    from llama_parity.converter.errors import ConversionError

    ckpt = _renamed(shape_only, registry.get("llama2-7b"), "my-model")
    with pytest.raises(ConversionError) as e:
        detect(ckpt)
    msg = str(e.value)
    assert "--variant" in msg and "llama1-7b" in msg and "llama2-7b" in msg and "\n" not in msg
    assert detect(ckpt, variant_id="llama1-7b").registry_id == "llama1-7b"


def test_guard3_8b_unscaled_rope(shape_only):
    """Bug class: Llama Guard 3 8B converted with Llama 3.1 scaling although its params.json says
    use_scaled_rope false (Meta's reference runs it unscaled); its moderation template has 14 categories."""
    v = detect(shape_only(registry.get("llama-guard-3-8b")))
    assert v.registry_id == "llama-guard-3-8b" and v.rope_scaling is None
    assert registry.guard_categories(v.registry_id) == 14 and v.max_position_embeddings == 131072
    cfg = hf_config.build_config(v, torch.bfloat16)
    assert cfg["rope_scaling"] is None


def test_guard3_8b_vs_llama3_8b_without_folder_name_requires_variant(shape_only):
    """Bug class: Guard 3 8B (unscaled) and Llama 3 8B share the architecture; a renamed folder
    must not silently become either (context 8192 vs 131072, chat template, eos)."""
    from llama_parity.converter.errors import ConversionError

    with pytest.raises(ConversionError, match="llama-guard-3-8b"):
        detect(_renamed(shape_only, registry.get("llama-guard-3-8b"), "checkpoint"))


@pytest.mark.parametrize("variant_id,folder", [
    ("llama3.1-405b", "Llama3.1-405B-bf16-mp8"), ("llama3.1-405b", "Llama-3.1-405B-MP8"),
    ("llama3.1-405b-mp16", "Llama3.1-405B-bf16-mp16"), ("llama3.1-405b-mp16", "Llama-3.1-405B-MP16"),
    ("llama3.1-405b-instruct-mp16", "Llama-3.1-405B-Instruct-MP16"),
    ("llama3.1-405b-instruct", "Llama3.1-405B-Instruct-bf16-mp8"),
])
def test_405b_bf16_folder_names(shape_only, variant_id, folder):
    """Bug class: Meta's real 405B folder names (the download CLI's -bf16-mp8/-mp16, the server's
    -MP8/-MP16) not recognised, so base/instruct or the MP16 kv layout is guessed."""
    v = detect(_renamed(shape_only, registry.get(variant_id), folder))
    assert v.registry_id == variant_id, v.evidence


def test_fp8_405b_refused(shape_only):
    """Bug class: Meta's FP8 405B checkpoint (folder Llama3.1-405B, fp8_scales_N.pt beside the
    shards, float8 FFN weights) read as if its weights were plain numbers."""
    from llama_parity.converter.errors import ConversionError

    spec = registry.get("llama3.1-405b")
    ckpt = _renamed(shape_only, spec, "Llama3.1-405B")
    (ckpt.dir / "fp8_scales_0.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match="FP8.*bf16-mp8"):
        detect(ckpt)
    ckpt = _renamed(shape_only, spec, "renamed-405b")  # no scale files: the fp8 dtype alone tells
    real_info = ckpt.info
    ckpt.info = lambda key, shard=0: (dataclasses.replace(real_info(key, shard), dtype=torch.float8_e4m3fn)
                                      if "feed_forward" in key else real_info(key, shard))
    with pytest.raises(ConversionError, match="float8_e4m3fn"):
        detect(ckpt)


@pytest.mark.parametrize("folder,want", [
    ("Llama-Guard-3-1B", "llama-guard-3-1b"), ("llama_guard_3_1b", "llama-guard-3-1b"),
    ("llama-guard-3-1b", "llama-guard-3-1b"), ("LLAMA_GUARD_3_1B", "llama-guard-3-1b"),
    ("Llama3.2-1B-Instruct", "llama3.2-1b-instruct"), ("Llama-3.2-1B-Instruct", "llama3.2-1b-instruct"),
    ("meta-llama--Llama-3.2-1B", "llama3.2-1b"), ("llama_3_2_1b", "llama3.2-1b"),
    ("Meta-Llama-3.1-8B-Instruct", "llama3.1-8b-instruct"), ("Meta-Llama-3-8B", "llama3-8b"),
    ("llama-2-13b-chat", "llama2-13b-chat"), ("Llama-2-13b-chat-hf", "llama2-13b-chat"),
    ("CodeLlama-34b", "codellama-34b"), ("codellama_34b_hf", "codellama-34b"),
    ("Llama3.3-70B-Instruct", "llama3.3-70b-instruct"), ("30B", "llama1-33b"),
    ("Llama-Guard-3-8B", "llama-guard-3-8b"), ("Llama3.1-405B-bf16-mp16", "llama3.1-405b"),
])
def test_folder_name_spellings(folder, want):
    """Bug class: one folder-name normalisation in detection and another in verify, so a correct
    conversion in a folder spelled another way (llama_guard_3_1b) is judged with another release's facts."""
    assert want in [v.id for v in registry.releases_named_by(folder)]


@pytest.mark.parametrize("folder", ["Llama-Guard-3-1B", "llama_guard_3_1b", "llama-guard-3-1b-finetune"])
def test_verify_reads_folder_names_like_detection(tmp_path, tiny, folder):
    """Bug class: verify failing a correct Llama Guard 3 1B conversion because its folder is named
    llama_guard_3_1b (the judge normalised names differently and expected factor 8)."""
    import shutil

    from llama_parity.converter.detect import detect as run_detect
    from llama_parity.converter.meta_checkpoint import MetaCheckpoint
    from llama_parity.parity import expected_rope_scaling

    src = tiny.meta("llama-guard-3-1b")
    dst = tmp_path / folder
    shutil.copytree(src, dst)
    assert expected_rope_scaling(dst).factor == 32.0
    assert run_detect(MetaCheckpoint(dst)).rope_scaling.factor == 32.0


def test_verify_passes_guard_1b_in_underscore_folder(tmp_path, tiny):
    """Bug class: the whole gate failing a right release for its folder's spelling (issue 8.4)."""
    import shutil

    from llama_parity.verify import verify

    dst = tmp_path / "llama_guard_3_1b"
    shutil.copytree(tiny.meta("llama-guard-3-1b"), dst)
    report = verify(dst, tiny.hf("llama-guard-3-1b"), bf16=False, tokenizer=False, memory="full")
    assert report.ok, report.render()


def test_fp8_checkpoint_refused_by_the_cli(tmp_path, tiny, capsys):
    """Bug class: an FP8 download converted with exit 0 (weights misread) or refused with a
    traceback; it must be exit 2, one line naming the bf16 download, nothing written."""
    import shutil

    from llama_parity.cli import main

    meta = tmp_path / "Llama3.1-405B"
    shutil.copytree(tiny.meta("llama3.1-8b"), meta)
    (meta / "fp8_scales_0.pt").write_bytes(b"")
    before = sorted((p.name, p.stat().st_size) for p in meta.iterdir())
    rc = main(["convert", "--input-dir", str(meta), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "FP8" in err[0] and "bf16-mp8" in err[0], err
    assert not (tmp_path / "out").exists()
    assert sorted((p.name, p.stat().st_size) for p in meta.iterdir()) == before


def test_fp8_checkpoint_refused_by_verify(tmp_path, tiny):
    """Bug class: verify judging an FP8 download as if its weights were plain numbers (a parity
    failure, exit 1, blaming the conversion) instead of saying what the input is (exit 2)."""
    import shutil

    from llama_parity.verify import InputError, verify

    meta = tmp_path / "Llama3.1-405B"
    shutil.copytree(tiny.meta("llama3.1-8b"), meta)
    (meta / "fp8_scales_0.pt").write_bytes(b"")
    with pytest.raises(InputError, match="FP8"):
        verify(meta, tiny.hf("llama3.1-8b"), tokenizer=False)

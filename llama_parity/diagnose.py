"""`llama-parity diagnose`: where a conversion first diverges, and which known bug explains it.

1. Stage by stage (embedding, then each layer's attention and feed-forward output, then logits),
   the reference and the HF model run the same prompt; the first stage whose output differs beyond
   the fp32 bound is reported. Inputs to that stage agree, so the fault is inside it.
2. Each bug of the mutation catalog (llama_parity/mutations.py) carries its repair. Repairs are
   tried on a scratch copy of the HF folder; those that restore parity name the bug. Metadata
   faults that leave the logits alone are named by the failing metadata check itself.
Works on models that fit in memory twice (tiny checkpoints, small releases); larger ones are refused
up front, pointing to the streamed `verify`, whose per-layer row names the first divergent layer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llama_parity.reference_model.model import load_meta_checkpoint

from . import mutations as m
from .metadata import identify_checkpoint, metadata_checks, structure_ok
from .parity import (FP32_REL_BOUND, check_far_positions, check_logits, expected_rope_scaling, load_hf_model,
                     model_prompts)


@dataclass
class Stage:
    name: str
    rel_diff: float
    ok: bool


@dataclass
class Hypothesis:
    bug: str
    restores_parity: bool
    logits_after: float
    far_after: float


@dataclass
class Diagnosis:
    parity: bool
    stages: list[Stage] = field(default_factory=list)
    first_divergence: str | None = None
    explained_by: list[str] = field(default_factory=list)
    tried: list[Hypothesis] = field(default_factory=list)
    series: dict = field(default_factory=dict)  # error per position, by check name (for --plot)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [f"{'stage':<28}  {'rel diff':>9}  result"]
        for s in self.stages:
            lines.append(f"{s.name:<28}  {s.rel_diff:9.2e}  {'ok' if s.ok else 'DIVERGES'}")
        if self.parity:
            lines.append("no divergence: the conversion is at parity")
            return "\n".join(lines)
        lines.append(f"first divergence: {self.first_divergence}")
        for h in self.tried:
            lines.append(f"  tried: {h.bug:<62} -> logits {h.logits_after:.2e}, far {h.far_after:.2e}"
                         f"{'  RESTORES PARITY' if h.restores_parity else ''}")
        if self.explained_by:
            lines.append("diagnosis: " + "; ".join(self.explained_by))
        else:
            lines.append("diagnosis: no known bug explains it (not in the catalog); see the first divergent stage")
        return "\n".join(lines)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-6)


@torch.inference_mode()
def compare_stages(ref, hf, tokens: list[int]) -> list[Stage]:
    trace: list = []
    ref_logits = ref.forward(torch.tensor([tokens]), 0, trace=trace)
    captured: list = []
    hooks = [hf.model.embed_tokens.register_forward_hook(lambda mod, i, o: captured.append(o))]
    for layer in hf.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda mod, i, o: captured.append(o[0] if isinstance(o, tuple) else o)))
        hooks.append(layer.mlp.register_forward_hook(lambda mod, i, o: captured.append(o)))
    try:
        ids = torch.tensor([tokens])
        logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in hooks:
            h.remove()
    stages = [Stage(name, d, d <= FP32_REL_BOUND) for (name, r), h in zip(trace, captured)
              for d in [_rel(r[0], h[0])]]
    d = _rel(ref_logits[0], logits[0])
    stages.append(Stage("logits", d, d <= FP32_REL_BOUND))
    return stages


def _quick(ref, hf_dir: Path, tokens: list[int]) -> tuple[float, float]:
    model = load_hf_model(hf_dir)
    return (check_logits(ref, model, tokens, "cpu").measured, check_far_positions(ref, model, tokens, "cpu").measured)


def _dtype_narrowing(meta_dir: Path, hf_dir: Path) -> str | None:
    """Weights stored in another float format than the checkpoint's: rounding, not a layout bug.
    Recognised when the final norm (replicated, never permuted) equals Meta's rounded to it."""
    from llama_parity.formats.pth import load_state_dict
    from llama_parity.formats.safetensors import SafetensorsReader

    meta_norm = load_state_dict(sorted(meta_dir.glob("consolidated.*.pth"))[0])["norm.weight"]
    hf_files = SafetensorsReader(hf_dir)
    try:
        hf_norm = hf_files.read("model.norm.weight")
    finally:
        hf_files.close()
    if hf_norm.dtype == meta_norm.dtype or not torch.equal(meta_norm.to(hf_norm.dtype), hf_norm):
        return None
    if torch.equal(meta_norm, hf_norm.to(meta_norm.dtype)):
        return None  # these values survive the round trip; no evidence of lost bits
    name = lambda d: str(d).replace("torch.", "")
    return (f"weights stored as {name(hf_norm.dtype)} while the checkpoint is {name(meta_norm.dtype)}: "
            "differences are rounding from the dtype change, not a layout bug (compare at that precision, "
            "or convert with --dtype matching the checkpoint)")


def diagnose(meta_dir: str | Path, hf_dir: str | Path, *, variant_id: str | None = None) -> Diagnosis:
    from llama_parity.formats.safetensors import read_index

    meta_dir, hf_dir = Path(meta_dir), Path(hf_dir)
    # verify's identification (what the HF folder claims included); an ambiguity raises IdentifyError
    ident = identify_checkpoint(meta_dir, variant_id=variant_id, hf_dir=hf_dir).require()
    rope = expected_rope_scaling(meta_dir, ident=ident)
    meta_checks = metadata_checks(meta_dir, hf_dir, rope, ident=ident)[0]
    if not structure_ok(meta_checks):
        # Another model's folder: no stage can be compared; say which tensors and dims differ.
        return Diagnosis(parity=False, first_divergence="tensor shapes and config dims",
                         explained_by=[f"{c.name}: {c.detail}" for c in meta_checks if not c.ok])
    config_faults = [f"{c.name}: {c.detail}" for c in meta_checks if not c.ok]
    ref = load_meta_checkpoint(meta_dir, rope_scaling=rope)
    try:
        hf = load_hf_model(hf_dir)
    except Exception as e:
        if not config_faults:
            raise
        # e.g. a rope_scaling without its fields: transformers refuses what the metadata checks name
        return Diagnosis(parity=False, first_divergence="config.json (transformers cannot build the model: "
                         f"{type(e).__name__}: {e})", explained_by=config_faults)
    tokens = model_prompts(meta_dir, min(hf.config.vocab_size, ref.args.vocab_size)).main  # verify's prompt
    stages = compare_stages(ref, hf, tokens)
    far = check_far_positions(ref, hf, tokens, "cpu")
    first = next((s.name for s in stages if not s.ok), None)
    if first is None and not far.ok:
        first = f"far positions only (rel diff {far.measured:.2e}): RoPE frequencies"
    diag = Diagnosis(parity=first is None and not config_faults, stages=stages, first_divergence=first,
                     series={c.name: c.series for c in (check_logits(ref, hf, tokens, "cpu"), far)})
    if diag.parity:
        return diag
    if first is None:
        # Numerically within bounds on this prompt, but the config contradicts the checkpoint
        # (e.g. a norm eps whose effect is below the bound): the config check is the diagnosis.
        diag.first_divergence = "config.json"
        diag.explained_by = config_faults
        return diag
    narrowed = _dtype_narrowing(meta_dir, hf_dir)
    if narrowed:
        diag.explained_by.append(narrowed)
        return diag
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["__tensor_names__"] = set(read_index(hf_dir))
    with tempfile.TemporaryDirectory() as tmp:
        fixes = [f for f in m.repairs() if f.applies(cfg)]
        # Only bugs that can first show where the divergence starts (all when no repair says so).
        fixes = [f for f in fixes if any(w in first for w in f.shows_in)] or fixes
        for fix in fixes:
            scratch = Path(tmp) / "repair"
            if scratch.exists():
                shutil.rmtree(scratch)
            shutil.copytree(hf_dir, scratch)
            try:
                fix.fix(scratch, meta_dir, rope)
                lg, fp = _quick(ref, scratch, tokens)
            except Exception:  # a repair that does not fit this model (shapes) is simply not the bug
                continue
            ok = lg <= FP32_REL_BOUND and fp <= FP32_REL_BOUND
            diag.tried.append(Hypothesis(fix.diagnosis, ok, lg, fp))
            if ok:
                diag.explained_by.append(fix.diagnosis)
    return diag

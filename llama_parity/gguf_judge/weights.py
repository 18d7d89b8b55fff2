"""Every GGUF weight against Meta's, one tensor at a time (row chunks), with a bound per stored type.

llama.cpp keeps Meta's layout, so a GGUF row is compared with the same Meta row, no permutation.
- F32 / F16 / BF16: bit for bit equal to Meta's tensor cast to that type (round to nearest even).
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (deterministic: one scale, and for _1 one minimum, per 32 values, each
  value rounded to the nearest level): each block is compared with the same quantisation of Meta's
  weights (gguf's reference implementation, which llama.cpp's converter itself uses); blocks that are not
  bit-identical (llama-quantize's C rounding may differ on ties) must hold every value within half a
  step of Meta's: |deq - x| <= d*(1/2 + qmax*2^-11)*(1 + 2^-10) + |m|*2^-11 + 2^-24, d and m the block's
  stored fp16 scale and minimum, qmax the largest level magnitude (127, 8, 15, 16, 31): the half step,
  plus the rounding of the scale and minimum to fp16 (half an ulp, 2^-11 relative) times the level.
  A block bit-identical to that quantisation passes as exact (the reference code itself clips a Q4_0/Q5_0
  value opposite the block's extreme at level 7/15: up to a whole step). A block that is neither
  identical nor within half a step (llama-quantize may search these types' scales, clipping) is held to
  the k-quant rule below with b = 8, 4 or 5 bits, which still catches a misplaced row.
- k-quants and i-quants (scales chosen by a search, values clipped, codebooks): per block of the format
  (256 values; 32 for IQ4_NL), the RMS error relative to the block's RMS must stay below
  B(b) = min(0.9, 2*sqrt(3)/(2^b - 1)) for a b-bit format: a b-bit grid over a block's range (about
  6 RMS for Gaussian-like weights) has RMS error sqrt(3)/(2^b - 1) of the block's RMS; twice that is
  the bound. A row or head from elsewhere gives ~sqrt(2) (two unrelated rows of one scale), so a
  misplaced row or head is caught at every bit width and an honest quant is not (margins in the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llama_parity.parity import Check

from .gguf_file import gguf_module
from .names import expected_names, merged, merged_rows

FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# deterministic block types: (largest level magnitude, has a stored minimum)
DETERMINISTIC = {"Q8_0": (127, False), "Q4_0": (8, False), "Q4_1": (15, True), "Q5_0": (16, False),
                 "Q5_1": (31, True)}
BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_K": 8, "IQ1_S": 1, "IQ1_M": 1, "IQ2_XXS": 2,
        "IQ2_XS": 2, "IQ2_S": 2, "IQ3_XXS": 3, "IQ3_S": 3, "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 1, "TQ2_0": 2,
        "MXFP4": 4}
CHUNK_VALUES = 1 << 24  # values per row chunk: ~64 MB of float32 per side


def block_bound(type_name: str) -> float:
    """B(b): the largest relative RMS error per block an honest b-bit quantisation gives (module doc)."""
    return min(0.9, 2 * 3 ** 0.5 / (2 ** BITS[type_name] - 1))


@dataclass
class TypeStats:
    tensors: int = 0
    blocks: int = 0
    identical_blocks: int = 0
    worst: float = 0.0  # largest (error / bound) seen
    worst_at: str = ""
    bad: list[str] = field(default_factory=list)
    searched: int = 0  # deterministic-type blocks beyond half a step, held to B(b) (a scale search's)

    def see(self, ratio: float, where: str) -> None:
        if ratio > self.worst:
            self.worst, self.worst_at = ratio, where
        if ratio > 1.0 and len(self.bad) < 6 and where.split(" ")[0] not in {b.split(" ")[0] for b in self.bad}:
            self.bad.append(where)


def _float_rows(t, want: torch.Tensor, start: int, stop: int) -> tuple[int, int]:
    """(values differing bit for bit, values) of rows [start, stop) of a float tensor (`want`: Meta's rows)."""
    dt = FLOATS[t.type_name]
    ref = want.to(dt).contiguous()
    ref_bits = ref.view(torch.int32 if dt == torch.float32 else torch.int16).numpy().view(
        np.uint32 if dt == torch.float32 else np.uint16)
    got = t.bits(start, stop).reshape(ref_bits.shape)
    return int(np.count_nonzero(got != ref_bits)), int(ref_bits.size)


def _half_step_ratio(t, raw: np.ndarray, deq: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per block: max |deq - x| over the half-step bound of the module doc."""
    qmax, has_min = DETERMINISTIC[t.type_name]
    n, size = t.block
    blocks = raw.reshape(-1, size)
    d = np.abs(blocks[:, 0:2].copy().view(np.float16).astype(np.float64).reshape(-1))
    m = np.abs(blocks[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1)) if has_min else 0.0
    bound = d * (0.5 + qmax * 2.0 ** -11) * (1 + 2.0 ** -10) + m * 2.0 ** -11 + 2.0 ** -24
    err = np.abs(deq.reshape(-1, n).astype(np.float64) - x.reshape(-1, n).astype(np.float64)).max(axis=1)
    return err / bound


def _rel_rms_ratio(t, deq: np.ndarray, x: np.ndarray) -> np.ndarray:
    n = t.block[0]
    xb = x.reshape(-1, n).astype(np.float64)
    e = np.sqrt(np.mean((deq.reshape(-1, n).astype(np.float64) - xb) ** 2, axis=1))
    return e / (block_bound(t.type_name) * np.sqrt(np.mean(xb ** 2, axis=1)) + 1e-30)


def compare_tensor(t, want, stats: TypeStats, name: str) -> None:
    """Compare one GGUF tensor with Meta's (merged) tensor, row chunk by row chunk, into `stats`. `want`:
    Meta's tensor, or a function of (start, stop) giving its rows (only each chunk's rows are read)."""
    g = gguf_module()
    if isinstance(want, torch.Tensor):
        whole = want.reshape(t.shape) if want.dim() == 1 else want
        whole = whole.reshape(whole.shape[0] if whole.dim() == 2 else 1, -1)
        want = lambda a, b: whole[a:b]  # noqa: E731
    rows, cols = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (1, int(np.prod(t.shape)))
    step = max(1, CHUNK_VALUES // max(1, cols))
    stats.tensors += 1
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        w = want(start, stop).reshape(stop - start, -1)
        if t.type_name in FLOATS:
            bad, total = _float_rows(t, w, start, stop)
            stats.blocks += total
            stats.identical_blocks += total - bad
            stats.see(float(bad > 0) * 2.0, f"{name} ({bad} values differ in rows {start}-{stop - 1})")
            continue
        x = w.float().numpy()
        raw = t.raw_rows(start, stop)
        deq = t.dequantized(start, stop)
        if t.type_name in DETERMINISTIC:
            ours = g.quants.quantize(x, t.qtype)
            same = np.all(ours.reshape(-1, t.block[1]) == raw.reshape(-1, t.block[1]), axis=1)
            # a block bit-identical to Meta's weights quantised alike is exact (Q4_0/Q5_0's reference code itself
            # clips a value opposite the block's extreme at level 7/15: a whole step, not half)
            ratio = np.where(same, 0.0, _half_step_ratio(t, raw, deq, x))
            stats.identical_blocks += int(same.sum())
            beyond = ratio > 1.0
            if beyond.any():  # llama-quantize may search these types' scales (clipping): the k-quant rule
                stats.searched += int(beyond.sum())
                ratio = np.where(beyond, _rel_rms_ratio(t, deq, x), ratio)
        else:
            ratio = _rel_rms_ratio(t, deq, x)
        stats.blocks += ratio.size
        worst = int(np.argmax(ratio))
        row = start + worst * t.block[0] // cols
        stats.see(float(ratio[worst]), f"{name} row {row} (block error {ratio[worst]:.3g}x its bound)")


def weight_checks(gf, meta, progress=None) -> list[Check]:
    """One check per class of stored type present; each names the worst tensor and row."""
    names = expected_names(meta)
    stats: dict[str, TypeStats] = {}
    items = [(n, k) for n, k in names.items() if n in gf.tensors and gf.tensors[n].shape == _shape(meta, k)]
    it = progress(items, "GGUF weights", unit="tensor") if progress else items
    for name, key in it:
        t = gf.tensors[name]
        cls = "float" if t.type_name in FLOATS else t.type_name
        want = (lambda a, b, key=key: merged_rows(meta, key, a, b)) if len(t.shape) == 2 else merged(meta, key)
        compare_tensor(t, want, stats.setdefault(cls, TypeStats()), name)
    return [_check(cls, s) for cls, s in sorted(stats.items())]


def _shape(meta, key: str) -> tuple:
    from llama_parity.metadata import hf_key

    hf = hf_key(key)
    return tuple(meta.merged_shapes().get(hf, tuple(meta.shards[0][key].shape))) if hf else ()


def _check(cls: str, s: TypeStats) -> Check:
    catches = "rows or heads misplaced (q/k in another rotary layout, a shifted vocabulary, swapped tensors), " \
              "weights from another checkpoint, a quantisation worse than its type"
    ok = s.worst <= 1.0
    if cls == "float":
        return Check("gguf weights: F32/F16/BF16 bit for bit", catches, float(len(s.bad) if not ok else 0), 0.0, ok,
                     f"{s.tensors} tensors equal Meta's cast" if ok else "differ from Meta's cast: " + "; ".join(s.bad))
    if cls in DETERMINISTIC:
        searched = (f"; {s.searched} blocks neither identical nor within half a step (a searched scale) held to the "
                    f"block RMS bound {block_bound(cls):.3g}") if s.searched else ""
        what = (f"{s.identical_blocks}/{s.blocks} blocks bit-identical to Meta's weights quantised alike; the others "
                f"within half a step{searched}: worst {s.worst:.3g} of the bound at {s.worst_at}")
        return Check(f"gguf weights: {cls} (half a step per value)", catches, s.worst, 1.0, ok,
                     what if ok else "beyond half a step and the block RMS bound: " + "; ".join(s.bad))
    return Check(f"gguf weights: {cls} (block RMS error <= {block_bound(cls):.3g} of the block's RMS)", catches,
                 s.worst, 1.0, ok, (f"{s.tensors} tensors, {s.blocks} blocks; worst {s.worst:.3g} of the bound at "
                                    f"{s.worst_at}") if ok else "beyond the bound: " + "; ".join(s.bad))


def file_type_check(gf) -> Check:
    """general.file_type names the type most weight matrices are stored in (of those whose rows that type
    can hold: llama-quantize falls back on rows shorter than a 256-value super-block)."""
    g = gguf_module()
    ft = gf.get("general.file_type")
    try:
        label = g.LlamaFileType(ft).name
    except (ValueError, TypeError):
        return Check("gguf: general.file_type", "a file type label another precision than the stored weights", 1.0,
                     0.0, False, f"general.file_type {ft!r} is not a llama.cpp file type")
    main = label.replace("ALL_", "").replace("MOSTLY_", "")
    main = {"IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "IQ2_M": "IQ2_S", "Q2_K_S": "Q2_K"}.get(main, main)
    if main[:1] == "Q" and main[-2:] in ("_S", "_M", "_L") and "_K" in main:
        main = main[:-2]
    if main not in g.GGMLQuantizationType.__members__:
        return Check("gguf: general.file_type", "", 0.0, 0.0, True, f"{label}: mixed types, not judged")
    n = g.GGML_QUANT_SIZES[g.GGMLQuantizationType[main]][0]
    mats = [t for name, t in gf.tensors.items() if len(t.shape) == 2 and t.shape[-1] % n == 0]
    counts: dict[str, int] = {}
    for t in mats:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    top = max(counts, key=counts.get) if counts else main
    ok = top == main
    return Check("gguf: general.file_type", "a file type label that names another precision than the stored "
                 "weights", 0.0 if ok else 1.0, 0.0, ok,
                 f"{label}: most weight matrices are {top} ({counts})" if ok else
                 f"{label} says {main}, most weight matrices are {top} ({counts})")

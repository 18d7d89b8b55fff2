"""Numerical parity checks: Meta reference (reference_model/) vs transformers' LlamaForCausalLM.

Each check returns a `Check`: what was measured, the bound, and the bug class it exists to catch.
Used by `llama-parity verify`, the demo and the parity test suite alike, so a release gate and
the tests hold a conversion to the same standard.

Bounds (why these numbers):
- fp32: both sides compute the same function; they differ only in summation order and in how
  RoPE is evaluated (complex multiply vs cos/sin on rotate_half). fp32 rounding (2^-24 relative)
  accumulated through a few layers leaves differences of ~1e-6 relative to the largest logit.
  We allow 1e-4 relative: 100x headroom, while every layout bug we know of (wrong head count in
  the rotary permutation, a shard merged on the wrong dim, a missing RoPE scale) moves logits by
  1e-2 to 1 relative on our weight scales.
- next-token distributions: per position, KL(p_meta || p_hf) in nats, reported as mean and max over
  positions (never averaged over the vocabulary, which would make a broken conversion look tiny).
  For logit differences d, KL ~ Var_p(d)/2 <= max|d|^2/2: fp32 differences of 1e-6 relative on
  logits of scale ~10-30 give KL ~1e-10; the bound 1e-6 nats leaves 1e4x headroom and is still
  far below any layout bug (the catalogued ones give 1e-3 to 1 nats on tiny models). Top-1
  agreement: the argmax must agree on every position whose reference top-2 margin exceeds twice the
  fp32 bound (a closer pair is a tie that rounding may legitimately break).
- bf16: judged against each model's own bf16 noise, not a fixed share of the logit scale: with
  e(x) = max|x - fp32 reference|, the HF model in bf16 passes when e(hf bf16) <= K * e(meta bf16)
  + the fp32 bound, i.e. HF in bf16 is at most K times further from the exact function than Meta's
  own code in bf16 on the same input. Meta keeps RoPE and norms in fp32 where HF rounds cos/sin and
  the normed activations to bf16, so HF's own bf16 error is legitimately larger: measured ratios
  e(hf)/e(meta) over the 22 tiny layouts are 0.78-1.88 (KL ratios 0.48-1.82); K = 3. The distribution
  analog: max KL(meta fp32 || hf bf16) <= K^2 * max KL(meta fp32 || meta bf16) + 1e-6 (KL grows with
  the square of the logit error).
- far positions: 12000 (beyond Llama 3's original 8192), and on scaled models also 32768 and the
  end of the 128k window, where factor 8 vs 32 and the interpolation band differ most.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llama_parity.reference_model.model import RopeScalingArgs, Transformer, load_meta_checkpoint

FP32_REL_BOUND = 1e-4
FP32_KL_BOUND = 1e-6  # nats, max over positions
BF16_NOISE_K = 3.0  # measured e(hf bf16)/e(meta bf16) over the 22 tiny layouts: 0.78-1.88
GREEDY_TOKENS = 20  # new tokens greedy generation compares with both whole models
FAR_START = 12_000  # beyond Llama 3's original 8192 context: where rope scaling factors differ most
SCALED_WINDOW = 131_072  # every Llama release with use_scaled_rope has a 128k context


def far_positions(rope_scaling) -> list[int]:
    """Where far-position queries sit: 12000 always; scaled models also 32k and the window's end."""
    return [FAR_START] + ([32_768, SCALED_WINDOW - 16] if rope_scaling is not None else [])


@dataclass
class Check:
    name: str
    catches: str  # the bug class this check exists for
    measured: float
    bound: float
    ok: bool
    detail: str = ""
    # Optional error per position or per layer for reports: {"x_label", "x": [...], "y": [...]}
    series: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def per_position(a: torch.Tensor, b: torch.Tensor, positions) -> dict:
    """rel_diff split by position (rows of [positions, vocab] logits): its max is the check's value."""
    a, b = a.float().cpu(), b.float().cpu()
    y = ((a - b).abs().amax(-1) / max(float(a.abs().max()), 1e-6)).tolist()
    return {"x_label": "position", "x": [int(p) for p in positions], "y": y}


KL_LABEL = "next-token KL (nats)"  # y_label of KL series: another unit than relative logit error, another chart


def kl_series(kl: torch.Tensor) -> dict:
    """KL per position (rows of the prompt, from 0): its max is the KL check's value."""
    return {"x_label": "position", "y_label": KL_LABEL, "x": list(range(len(kl))), "y": [float(v) for v in kl]}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    scale = max(float(a.abs().max()), 1e-6)
    return float((a - b).abs().max()) / scale


def quiet_transformers() -> None:
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x; use whichever this version takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_hf_model(hf_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    quiet_transformers()
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


def fixed_prompt(vocab_size: int, length: int = 24, seed: int = 1234) -> list[int]:
    """Random ordinary ids (no special tokens): the fairscale cross-check's prompt."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


@dataclass(frozen=True)
class Prompts:
    main: list[int]  # logits, KL, kv-cache decode, bf16: a whole sequence as real use sends one
    greedy: list[int]  # greedy generation continues this (a chat prompt ending with the assistant header)
    source: str


def family_specials(vocab_size: int, tokenizer=None) -> dict[str, int]:
    """BOS / header / end-of-turn ids: from Meta's tokenizer when there is one, else the family's
    fixed ids (Llama 3: 128000, 128006/128007, 128009; Llama 1/2 and Code Llama: <s> 1, </s> 2)."""
    if tokenizer is not None and getattr(tokenizer, "kind", "") == "tiktoken":
        ids = {"bos": tokenizer.bos_id, "start_header": tokenizer.start_header_id,
               "end_header": tokenizer.end_header_id, "eot": tokenizer.eot_id}
    elif tokenizer is not None:
        ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    elif vocab_size == 128256:
        ids = {"bos": 128000, "start_header": 128006, "end_header": 128007, "eot": 128009}
    else:
        ids = {"bos": 1, "eos": 2}
    return {k: v for k, v in ids.items() if 0 <= v < vocab_size}


def numeric_prompt(vocab_size: int, specials: dict[str, int], length: int = 32, seed: int = 1234) -> Prompts:
    """Random ordinary ids framed as real prompts are: BOS, a header around a role id, end-of-turn,
    the next header (or </s><s> for Llama 2), so the embedding rows only special tokens use run too."""
    lowest = min(specials.values(), default=vocab_size)
    ordinary = lowest if lowest > vocab_size // 2 else vocab_size  # Llama 3 specials sit at the top
    g = torch.Generator().manual_seed(seed)
    words = [t for t in torch.randint(0, ordinary, (length,), generator=g).tolist() if t not in specials.values()]
    sp = specials.get
    if "start_header" in specials:
        turn = lambda w: [sp("start_header"), w[0], sp("end_header"), *w[1:]]
        ids = [sp("bos"), *turn(words[:12]), sp("eot"), *turn(words[12:])]
    else:
        ids = [sp("bos"), *words[:12], sp("eos"), sp("bos"), *words[12:]]
    ids = [t for t in ids if t is not None][:length]
    return Prompts(ids, ids[:8], "numeric ids with the family's special tokens")


PROMPT_TEXT = "The Eiffel Tower is in Paris. In 1889, 12 + 30 = 42 and"
PROMPT_DIALOG = [{"role": "system", "content": "Answer briefly."},
                 {"role": "user", "content": "What is the capital of France?"}]


def model_prompts(meta_dir: Path | None, vocab_size: int) -> Prompts:
    """Real text through the checkpoint's own tokenizer (Meta's encoding, then Meta's chat format),
    when the Meta folder has one; otherwise numeric ids with the family's special tokens."""
    from llama_parity.reference_model.chat_format import dialog_tokens
    from llama_parity.reference_model.tokenizer import load_meta_tokenizer

    tok_path = None
    if meta_dir is not None:
        meta_dir = Path(meta_dir)
        tok_path = next((p for p in (meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model")
                         if p.is_file()), None)
    tok = None
    if tok_path is not None:
        try:
            tok = load_meta_tokenizer(tok_path)
        except Exception:  # an unreadable tokenizer is the tokenizer check's finding, not the model's
            tok = None
    if tok is not None:
        text = tok.encode(PROMPT_TEXT, bos=True, eos=False)
        chat = dialog_tokens(tok, PROMPT_DIALOG)
        ids = text + chat
        if ids and max(ids) < vocab_size:
            return Prompts(ids, chat, f"text and a chat dialog in the checkpoint's tokenizer ({tok_path.name})")
    return numeric_prompt(vocab_size, family_specials(vocab_size, tok))


@torch.inference_mode()
def hf_logits(model, tokens: list[int], device: str) -> torch.Tensor:
    ids = torch.tensor([tokens], device=device)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


@torch.inference_mode()
def ref_logits(ref: Transformer, tokens: list[int]) -> torch.Tensor:
    return ref.forward(torch.tensor([tokens]), 0)[0]


# --- criteria (shared by the full and the streamed checks) -----------------------------------------
def next_token_kl(ref: torch.Tensor, hf: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_hf) in nats at each position (rows of logits)."""
    out = []
    for a, b in zip(ref, hf):  # a row at a time in float64: ~1e-15 values, and no (positions x vocab) copies
        la, lb = torch.log_softmax(a.double().cpu(), -1), torch.log_softmax(b.double().cpu(), -1)
        out.append((la.exp() * (la - lb)).sum())
    return torch.stack(out).clamp_min(0)


def top1_flips(ref: torch.Tensor, hf: torch.Tensor, rel_tol: float = FP32_REL_BOUND) -> tuple[list[int], int]:
    """(positions whose argmax differs, number of positions compared); positions whose reference top-2
    margin is within 2 * rel_tol of the logit scale are ties rounding may break, and are not compared."""
    ref, hf = ref.float().cpu(), hf.float().cpu()
    top2 = ref.topk(min(2, ref.shape[-1]), -1).values
    decided = (top2[:, 0] - top2[:, -1]) > 2 * rel_tol * max(float(ref.abs().max()), 1e-6)
    differ = ref.argmax(-1) != hf.argmax(-1)
    return torch.nonzero(differ & decided).flatten().tolist(), int(decided.sum())


def top1_disagreements(ref: torch.Tensor, hf: torch.Tensor, rel_tol: float = FP32_REL_BOUND) -> tuple[int, int]:
    """(positions whose argmax differs, positions compared): top1_flips counted."""
    flips, n = top1_flips(ref, hf, rel_tol)
    return len(flips), n


def _at(positions: list[int], most: int = 12) -> str:
    return "" if not positions else " (at " + ", ".join(map(str, positions[:most])) + (
        ", ..." if len(positions) > most else "") + ")"


def compare_fp32(name: str, catches: str, ref: torch.Tensor, hf: torch.Tensor, detail: str,
                 positions=None) -> Check:
    """Max |diff| relative to the logit scale, with next-token KL and top-1 agreement also required."""
    d = rel_diff(ref, hf)
    kl = next_token_kl(ref, hf)
    bad, n = top1_disagreements(ref, hf)
    ok = d <= FP32_REL_BOUND and float(kl.max()) <= FP32_KL_BOUND and bad == 0
    return Check(name, catches, d, FP32_REL_BOUND, ok,
                 f"{detail}; next-token KL mean {float(kl.mean()):.1e}, max {float(kl.max()):.1e} nats "
                 f"(bound {FP32_KL_BOUND:.0e}); top-1 differs at {bad} of {n} decided positions",
                 series=per_position(ref, hf, range(len(ref)) if positions is None else positions))


def distribution_checks(ref: torch.Tensor, hf: torch.Tensor, what: str) -> list[Check]:
    """The user-facing view of the fp32 logits: next-token KL per position and top-1 agreement."""
    kl = next_token_kl(ref, hf)
    flips, n = top1_flips(ref, hf)
    # Top-1 carries no series: a 0/1 flag per position has no magnitude to read against a bound (on
    # the log axis it is the floor or 1), and flips happen where the KL series peaks; the detail
    # lists the positions instead.
    return [
        Check("next-token KL (fp32)", "any fault that changes what the model predicts, in nats",
              float(kl.max()), FP32_KL_BOUND, float(kl.max()) <= FP32_KL_BOUND,
              f"max over {len(kl)} positions of {what}; mean {float(kl.mean()):.1e} nats; "
              f"KL ~ Var(diff)/2, fp32 rounding gives ~1e-10", series=kl_series(kl)),
        Check("top-1 agreement (fp32)", "a fault that flips the predicted token", float(len(flips)), 0.0, not flips,
              f"argmax differs at {len(flips)} of {n} positions{_at(flips)} (positions with a top-2 margin below "
              f"{2 * FP32_REL_BOUND:.0e} of the logit scale are ties and not counted)"),
    ]


def bf16_checks(ref32: torch.Tensor, ref16: torch.Tensor, hf16: torch.Tensor, hf32: torch.Tensor | None = None) -> list[Check]:
    """HF in bf16 against the exact function (Meta fp32), bounded by K times Meta's own bf16 error."""
    scale = max(float(ref32.abs().max()), 1e-6)
    err = lambda x: float((x.float().cpu() - ref32.float().cpu()).abs().max()) / scale
    e_hf, e_ref = err(hf16), err(ref16)
    bound = BF16_NOISE_K * e_ref + FP32_REL_BOUND
    kl_each = next_token_kl(ref32, hf16)
    kl_hf, kl_ref = float(kl_each.max()), float(next_token_kl(ref32, ref16).max())
    kl_bound = BF16_NOISE_K ** 2 * kl_ref + FP32_KL_BOUND
    own = "" if hf32 is None else (f"; HF bf16 vs HF fp32 "
                                   f"{float((hf16.float().cpu() - hf32.float().cpu()).abs().max()) / scale:.2e}")
    bad, n = top1_disagreements(ref32, hf16, rel_tol=bound)
    return [
        Check("logits (bf16)", "precision lost in conversion or a computation that rounds more than bf16 implies",
              e_hf, bound, e_hf <= bound,
              f"max |HF bf16 - Meta fp32| / max |logit|; bound {BF16_NOISE_K:g} x Meta's own bf16 error "
              f"({e_ref:.2e}) + {FP32_REL_BOUND:.0e}{own}; top-1 vs Meta fp32 differs at {bad} of {n} positions",
              series=per_position(ref32, hf16, range(len(ref32)))),
        Check("next-token KL (bf16)", "bf16 predictions further from the exact model than bf16 explains",
              kl_hf, kl_bound, kl_hf <= kl_bound,
              f"max KL(Meta fp32 || HF bf16); bound {BF16_NOISE_K ** 2:g} x max KL(Meta fp32 || Meta bf16) "
              f"({kl_ref:.1e}) + {FP32_KL_BOUND:.0e}", series=kl_series(kl_each)),
    ]


def check_logits(ref: Transformer, hf, tokens: list[int], device: str) -> Check:
    return compare_fp32("logits (fp32)", "weights permuted/merged wrongly, wrong norm eps, wrong FFN size or theta",
                        ref_logits(ref, tokens), hf_logits(hf, tokens, device),
                        f"max |diff| / max |logit| over {len(tokens)} positions")


def kv_steps(n: int, split: int = 8, singles: int = 8) -> list[tuple[int, int]]:
    """Prefill `split`, decode `singles` tokens one at a time, then the rest as one chunk through the
    cache. Each single-token step reads every weight for one token (a matrix-vector product), so they
    are few: the bug classes (cache layout, GQA order, position offsets) show at the first steps."""
    steps = [(0, split)] + [(i, i + 1) for i in range(split, min(n, split + singles))]
    return steps + ([(split + singles, n)] if n > split + singles else [])


def kv_detail(n: int) -> str:
    steps = kv_steps(n)
    rest = f", then {steps[-1][1] - steps[-1][0]} tokens" if steps[-1][1] - steps[-1][0] > 1 and len(steps) > 1 else ""
    return f"prefill {steps[0][1]}, {sum(b - a == 1 for a, b in steps[1:])} single-token steps{rest} through the cache"


@torch.inference_mode()
def check_kv_cache(ref: Transformer, hf, tokens: list[int], device: str) -> Check:
    """Prefill, then decode step by step (kv_steps), on both sides' KV caches."""
    from transformers import DynamicCache

    cache = ref.new_cache(1, len(tokens))
    kw = {_cache_kwarg(hf): DynamicCache()}  # filled in place by each call
    ids = torch.tensor([tokens], device=device)
    r, h = [], []
    for a, b in kv_steps(len(tokens)):
        r.append(ref.forward(torch.tensor([tokens[a:b]]), a, cache=cache)[0])
        out = hf(input_ids=ids[:, a:b], use_cache=True, attention_mask=torch.ones(1, b, dtype=torch.long, device=device),
                 **kw)
        h.append(out.logits[0].float())
    return compare_fp32("kv-cache decode", KV_CATCHES, torch.cat(r), torch.cat(h), kv_detail(len(tokens)))


KV_CATCHES = ("k/v cached in the wrong layout, kv heads repeated in the wrong order (GQA), "
              "positions off by one during incremental decoding")
FAR_CATCHES = "missing or wrong RoPE scaling (factor 8 vs 32, scaling on a model without it), wrong rope_theta"
GREEDY_CATCHES = "anything that flips a generated token: generation_config or cache bugs that logits on one prompt miss"


def far_check(worst: list[tuple[int, Check]]) -> Check:
    """One row for all far positions: the worst one, each listed."""
    pos, c = max(worst, key=lambda pc: pc[1].measured / pc[1].bound)
    ok = all(x.ok for _, x in worst)
    each = ", ".join(f"{p}: {x.measured:.1e}" for p, x in worst)
    tail = c.detail.removeprefix(f"at {pos}").lstrip(" :;,")  # the sub-check's own "at POS" said it already
    series = {"x_label": "position", "x": [x for _, w in worst if w.series for x in w.series["x"]],
              "y": [y for _, w in worst if w.series for y in w.series["y"]]}
    return Check("far positions", FAR_CATCHES, c.measured, c.bound, ok,
                 f"8 tokens at 0..7, 4 at each far start ({each}); worst at {pos}" + (f": {tail}" if tail else ""),
                 series=series)


@torch.inference_mode()
def check_far_positions(ref: Transformer, hf, tokens: list[int], device: str, *, starts: list[int] | None = None,
                        prefix: int = 8) -> Check:
    """Prefill `prefix` tokens at positions 0.., then a chunk at positions start..: relative distances
    of 12000 to 131056 make every RoPE frequency count, including the long-wavelength ones that Llama
    3.1 scaling changes (a factor of 8 instead of 32 is invisible at short distances). The reference
    runs them in one cache-less pass with explicit positions; HF through its cache with a jump."""
    from transformers import DynamicCache

    chunk = tokens[prefix:prefix + 4]
    results = []
    for start in starts or [FAR_START]:
        pos = torch.cat([torch.arange(prefix), torch.arange(start, start + len(chunk))])
        r = ref.forward(torch.tensor([tokens[:prefix] + chunk]), positions=pos)[0, prefix:]
        kw = {_cache_kwarg(hf): DynamicCache()}
        ids = torch.tensor([tokens[:prefix]], device=device)
        hf(input_ids=ids, use_cache=True, attention_mask=torch.ones_like(ids), **kw)
        # transformers 5 treats a jump in position_ids as a packed-sequence boundary unless an explicit
        # attention_mask says every earlier token is visible: pass one.
        hpos = torch.arange(start, start + len(chunk), device=device)[None]
        out = hf(input_ids=torch.tensor([chunk], device=device), position_ids=hpos, use_cache=True, **kw,
                 attention_mask=torch.ones(1, prefix + len(chunk), dtype=torch.long, device=device))
        results.append((start, compare_fp32("far positions", FAR_CATCHES, r, out.logits[0].float(), f"at {start}",
                                             positions=range(start, start + len(chunk)))))
    return far_check(results)


def greedy_check(ref_tokens: list[int], hf_tokens: list[int], how: str) -> Check:
    first = next((i for i, (a, b) in enumerate(zip(ref_tokens, hf_tokens)) if a != b), None)
    if first is None and len(ref_tokens) != len(hf_tokens):
        first = min(len(ref_tokens), len(hf_tokens))
    mism = 0 if first is None else len(ref_tokens) - first
    return Check("greedy generation", GREEDY_CATCHES, float(mism), 0.0, mism == 0,
                 f"{len(ref_tokens)} new tokens {how}: " + (
                     "identical" if mism == 0 else f"first difference at new token {first}: meta {ref_tokens} vs hf {hf_tokens}"))


@torch.inference_mode()
def check_greedy(ref: Transformer, hf, tokens: list[int], device: str, *, n_new: int = GREEDY_TOKENS) -> Check:
    r = ref.generate_greedy(tokens, n_new)
    ids = torch.tensor([tokens], device=device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                      max_length=None, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None,
                      temperature=None, top_p=None, top_k=None)
    return greedy_check(r, out[0, len(tokens):].tolist(), "(Meta's generate vs transformers' generate)")


def run_model_checks(meta_dir: Path, hf_dir: Path, *, rope_scaling: RopeScalingArgs | None, device: str = "cpu",
                     n_words: int | None = None, bf16: bool = True, prompt: list[int] | None = None,
                     loader=None, round_to: torch.dtype | None = None, quick: bool = False,
                     greedy_tokens: int = GREEDY_TOKENS, round_vectors: bool = True) -> list[Check]:
    """All numerical checks on one Meta/HF pair; models loaded once per dtype.

    `loader(dtype) -> (reference, hf model)` replaces the in-process loading: distributed.py passes
    models split across ranks that speak the same interface, so every check runs unchanged.
    `round_to`: the HF weights' dtype when the conversion changed it; the fp32 reference then uses
    Meta's weights rounded to it (what a faithful dtype change computes), so the fp32 bound still
    applies (norms too unless `round_vectors` is False: kept in float32 beside the rounded matrices). `quick`: fp32 logits and far positions only (layout and RoPE bugs; no cache, greedy, bf16)."""
    def load_here(dtype):
        ref = load_meta_checkpoint(meta_dir, rope_scaling=rope_scaling, tokenizer_n_words=n_words, device=device,
                                   dtype=dtype)
        if round_to is not None and dtype == torch.float32:
            ref.w = [{k: v.to(round_to).float() if round_vectors or v.dim() >= 2 else v.float() for k, v in sd.items()}
                     for sd in ref.w]
        return ref, load_hf_model(hf_dir, device=device, dtype=dtype)

    load = loader or load_here
    ref, hf = load(torch.float32)
    prompts = model_prompts(meta_dir, min(hf.config.vocab_size, ref.args.vocab_size))
    tokens = prompt or prompts.main
    (r32, ref_hidden), (h32, hf_hidden) = ref_traced(ref, tokens), hf_traced(hf, tokens, device)
    logits = compare_fp32("logits (fp32)", "weights permuted/merged wrongly, wrong norm eps, wrong FFN size or theta",
                          r32, h32, f"max |diff| / max |logit| over {len(tokens)} positions ({prompts.source})")
    checks = [_layout_check(hf_dir), layers_check([rel_diff(a, b) for a, b in zip(ref_hidden, hf_hidden)]),
              logits, *distribution_checks(r32, h32, prompts.source)]
    far = check_far_positions(ref, hf, tokens, device, starts=far_positions(rope_scaling))
    if quick:  # the streamed verify's rows and order (streaming._judge)
        return checks + [far]
    checks += [check_kv_cache(ref, hf, tokens, device), far, check_greedy(ref, hf, prompts.greedy, device,
                                                                          n_new=greedy_tokens)]
    del ref, hf
    if bf16:
        ref, hf = load(torch.bfloat16)
        checks += bf16_checks(r32, ref_logits(ref, tokens), hf_logits(hf, tokens, device), h32)
    return checks


def _layout_check(hf_dir: Path) -> Check:
    """What from_pretrained did with the files, judged as the streamed verify judges it (the same row)."""
    from .hf_layers import StreamingHF

    return StreamingHF(Path(hf_dir)).layout_check()[0]


@torch.inference_mode()
def ref_traced(ref: Transformer, tokens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the hidden state after each layer (the residual stream, as Meta's forward adds it)."""
    trace = []
    logits = ref.forward(torch.tensor([tokens]), 0, trace=trace)[0]
    h, hidden = trace[0][1], []
    for name, t in trace[1:]:
        h = h + t
        if name.endswith("feed-forward"):
            hidden.append(h[0].float().cpu())
    return logits, hidden


@torch.inference_mode()
def hf_traced(model, tokens: list[int], device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each decoder layer's output, caught by forward hooks (the same in transformers 4 and 5)."""
    hidden = []
    hook = lambda mod, inp, out: hidden.append((out[0] if isinstance(out, tuple) else out)[0].float().cpu())
    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        return hf_logits(model, tokens, device), hidden
    finally:
        for h in handles:
            h.remove()


def layers_check(diffs: list[float]) -> Check:
    """Hidden states after each layer: the first divergent layer is named."""
    worst = max(range(len(diffs)), key=lambda i: diffs[i])
    first_bad = next((i for i, d in enumerate(diffs) if d > FP32_REL_BOUND), None)
    return Check("hidden states per layer", "a fault inside one layer (permutation, merge, norm)",
                 diffs[worst], FP32_REL_BOUND, first_bad is None,
                 "all layers agree" if first_bad is None else f"first divergent layer: {first_bad}",
                 series={"x_label": "layer", "x": list(range(len(diffs))), "y": list(diffs)})


def expected_rope_scaling(meta_dir: Path, variant_id: str | None = None, *, hf_dir: Path | None = None,
                          ident=None) -> RopeScalingArgs | None:
    """The judge's own reading of which RoPE scaling a Meta checkpoint was trained with: the one
    identification (metadata.identify_checkpoint: params.json, the folder's name, tying, and what
    the HF folder claims when given), not the converter's decision. An ambiguity raises
    releases.IdentifyError with the line convert prints too."""
    from .metadata import identify_checkpoint

    if ident is None:
        ident = identify_checkpoint(Path(meta_dir), variant_id=variant_id, hf_dir=hf_dir).require()
    s = ident.rope_scaling
    return None if s is None else RopeScalingArgs(s.factor, s.low_freq_factor, s.high_freq_factor,
                                                  s.original_max_position_embeddings)

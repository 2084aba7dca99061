"""`blockskip plan`: from a sensitivity profile and a skip budget, the skip plan.

For a budget of k blocks the plan skips the first n and the last m blocks with n + m = k,
choosing the split that minimizes `Dpre[n] + Dsuf[m] + stale[m] * Dpre[L]`: the paper's score
plus what the last m blocks' cached residual gets wrong once LoRA changes their input (the
profile's `stale`; `--paper-argmin` leaves it out, `--max-last` caps m, `--split N M` takes a
split as given). It prints the split, why, and the paper's argmin in one line. The plan JSON
also carries the patch schedule, the LoRA config, the sample count, the feature storage and
estimates of edge training memory, of the subject bundle (features per draw and per subject,
prompt bank per prompt) and of the base pack (the kept weights, once per model and plan).
`--quant int8|nf4` stores the kept blocks' Linear weights quantized in the base pack (QLoRA on
the board; format: host/BUNDLE.md).
Crop sizes and the text length not given on the command line come from the model (its recorded
image size and text encoder; see --help), and the command prints which.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from blockskip.boards import BOARDS, GIB, budget_from, gib
from blockskip.errors import ConfigError, InputError
from blockskip.features import FEATURE_DTYPES, storage_dtype
from blockskip.host.fit import choose, generation_summary
from blockskip.host.profile import PIXEL_SIZE, recorded_size, resolve_model
from blockskip.models.skip import SkipPlan
from blockskip.plan import LoraSettings, PatchSchedule, PlanDocument
from blockskip.quant import QUANT_SCHEMES, quantized_bytes

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# What `blockskip plan` asks the cache to store when not told: bf16 features and 300 unique draws,
# which `blockskip train`'s 500 steps x 4 cycle through (about 6.7 uses each). On the crop model
# neither costs fidelity (bf16 vs fp32: -0.00 of LoRA's gain; 1/4 and 1/8 as many draws as
# micro-steps: +0.21 and +0.07; benchmarks/results/feature-storage/), and at FLUX.1-dev's shapes
# and the 50% plan they make a 1.85 GiB subject bundle instead of 23.7 GiB (cache_size.md).
DEFAULT_FEATURE_DTYPE = "bf16"
DEFAULT_SAMPLES = 300
# Activation bytes that training keeps per token x width x kept block, measured (exact peaks of
# benchmarks/results/train_memory_quant.md, less weights, LoRA and its AdamW state): frozen base
# layers under LoRA save their inputs only and attention saves no tokens x tokens matrix, so this
# is well under Korthikanti et al.'s s*h*(34 + 5*a*s/h) for fully trained layers (which this
# estimate used before: 1.2-4.1x the measured peaks). bf16 (autocast on a GPU): 15.8-16.6 values
# of 2 bytes on FLUX.1-dev shapes; fp32 (CPU): 11.3-12.5 values of 4 bytes on FLUX.1-dev and the
# 57-block proxy. With these the estimate is within 5% of every measured row.
ACTIVATION_BYTES = {"bf16": 32, "fp16": 32, "fp32": 48}


def skip_budget(num_blocks: int, ratio: float | None = None, blocks: int | None = None) -> int:
    """Blocks to skip: `blocks`, or `ratio` of the model rounded half up (FLUX 57 x 0.5 -> 29)."""
    if (ratio is None) == (blocks is None):
        raise ConfigError("give exactly one of a skip ratio or a block count")
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise ConfigError(f"skip ratio must be in [0, 1), got {ratio}")
        blocks = math.floor(ratio * num_blocks + 0.5)
    if not 0 <= blocks < num_blocks:
        raise ConfigError(f"cannot skip {blocks} blocks of a {num_blocks}-block model: at least one must be kept")
    return blocks


def split_scores(d_pre: list[float], d_suf: list[float], k: int, stale: list[float] | None = None) -> list[float]:
    """The score of every split (n, k - n), n = 0 .. k: `Dpre[n] + Dsuf[m]` (the paper's), plus
    `stale[m] * Dpre[L]` when the profile measured staleness: a last span whose cached residual
    misses a fraction `stale[m]` of the change LoRA makes at its input costs that fraction of
    what the text does to the image (Dpre[L]: every block's text attention masked)."""
    if len(d_pre) != len(d_suf):
        raise ConfigError(f"profile Dpre and Dsuf lengths differ ({len(d_pre)} vs {len(d_suf)})")
    if stale is not None and len(stale) != len(d_pre):
        raise ConfigError(f"profile stale and Dpre lengths differ ({len(stale)} vs {len(d_pre)})")
    if not 0 <= k <= len(d_pre) - 1:
        raise ConfigError(f"cannot skip {k} blocks: the profile covers {len(d_pre) - 1}")
    whole = d_pre[-1]
    return [d_pre[n] + d_suf[k - n] + (stale[k - n] * whole if stale is not None else 0.0) for n in range(k + 1)]


def choose_split(d_pre: list[float], d_suf: list[float], k: int, max_last: int | None = None,
                 stale: list[float] | None = None) -> tuple[int, int]:
    """(n, m) with n + m = k minimizing the split's score (`split_scores`); ties go to the larger n.

    Without `stale` this is the paper's argmin of Dpre[n] + Dsuf[m]. With it, skipping blocks at
    the end also pays for their cached residual going stale as LoRA trains the blocks before them:
    on the 8-block crop model that moves the 50% plan from (1, 3) to (4, 0) (0.51 -> 0.81 of LoRA's
    fidelity gain, benchmarks/results/README.md); where the last blocks' residual barely depends
    on their input (stale[m] near 0) the paper's split stays. `max_last` caps m (None: no cap)."""
    if max_last is not None and max_last < 0:
        raise ConfigError(f"max_last must be >= 0, got {max_last}")
    scores = split_scores(d_pre, d_suf, k, stale)
    cap = k if max_last is None else min(k, max_last)
    best = min(range(k - cap, k + 1), key=lambda n: (scores[n], -n))
    return best, k - best


def explain_split(profile: dict, k: int, n: int, m: int, how: str) -> str:
    """One line: the split taken, why, and what the paper's argmin of Dpre[n] + Dsuf[m] would have been."""
    d_pre, d_suf, stale = profile["d_pre"], profile["d_suf"], profile.get("stale")
    paper = choose_split(d_pre, d_suf, k)
    line = f"split ({n}, {m}) of {k} skipped blocks: {how}"
    if paper == (n, m):
        if how.startswith("the paper's argmin"):
            return line
        line += "; the same as the paper's argmin of Dpre[n] + Dsuf[m]"
        if stale is not None and m:
            line += f" (its last {m} blocks' cached residual misses {stale[m]:.2f} of a change at their input)"
        return line
    line += f"; the paper's argmin of Dpre[n] + Dsuf[m] would be {paper}"
    if stale is None:
        return line
    scores = split_scores(d_pre, d_suf, k, stale)
    return line + (f" (Dpre + Dsuf {d_pre[paper[0]] + d_suf[paper[1]]:.3f} against {d_pre[n] + d_suf[m]:.3f}), but its "
                   f"last {paper[1]} blocks' cached residual misses {stale[paper[1]]:.2f} of a change at their input "
                   f"(score {scores[paper[0]]:.3f} against {scores[n]:.3f})")


def kept_linears(family, plan: SkipPlan) -> list[tuple[str, torch.nn.Linear]]:
    """(full module path, module) of every nn.Linear in the kept blocks: what `--quant` quantizes."""
    names = family.block_names()
    return [(f"{names[i]}.{name}", module) for i in plan.kept
            for name, module in family.block(i).named_modules() if isinstance(module, torch.nn.Linear)]


def weight_bytes(family, plan: SkipPlan, bytes_per: int, quant: str = "none") -> tuple[int, int]:
    """(bytes the board holds for the kept blocks' and the head's weights, the largest transient
    of dequantizing one weight): Linear weights of the kept blocks in `quant`, everything else at
    `bytes_per`. NF4 decodes through one gathered copy and its scaled result; int8 through one."""
    kept = sum(p.numel() for i in plan.kept for p in family.block(i).parameters())
    head = sum(p.numel() for name in family.head_module_names() for p in _params(family.model, name))
    if quant == "none":
        return (kept + head) * bytes_per, 0
    linears = [module.weight.shape for _, module in kept_linears(family, plan)]
    quantized = sum(out * inp for out, inp in linears)
    largest = max(out * inp for out, inp in linears)
    held = (kept + head - quantized) * bytes_per + sum(quantized_bytes(tuple(s), quant) for s in linears)
    return held, largest * bytes_per * (2 if quant == "nf4" else 1)


def estimate(model_desc: dict, family, plan: SkipPlan, lora: LoraSettings, s_min: int, text_len: int,
             precision: str = "bf16", feature_dtype: str = "fp32", samples: int = 1, quant: str = "none") -> dict:
    """Analytic estimates for one batch-1 draw at s_min: edge training memory (kept weights, their
    Linear weights as `quant` stores them, + the transient of dequantizing one + LoRA + its AdamW
    state + kept-block activations, ACTIVATION_BYTES per token x width x kept block), the feature
    cache bytes per draw in
    `feature_dtype` and for `samples` draws and one training prompt (`cache_bytes`), and the
    prompt bank's bytes per prompt."""
    bytes_per = BYTES[precision]
    granularity = model_desc["granularity"]
    n_img = (s_min // granularity) ** 2
    hidden = getattr(family.model, "inner_dim", None) or (
        family.config["num_attention_heads"] * family.config["attention_head_dim"])
    seq = family.sequence_length(n_img, text_len)
    kept_params = sum(p.numel() for i in plan.kept for p in family.block(i).parameters())
    lora_params = 0
    modules = dict(family.model.named_modules())
    for i in plan.kept:
        for name in family.lora_targets(i, lora.scope):
            weight = modules[name].weight
            lora_params += lora.rank * (weight.shape[0] + weight.shape[1])
    activations = len(plan.kept) * seq * hidden * ACTIVATION_BYTES[precision]
    weights, transient = weight_bytes(family, plan, bytes_per, quant)
    memory = weights + transient + lora_params * (4 + 4 + 8) + activations
    config = model_desc["config"]
    target = n_img * config.get("in_channels", 4) * config.get("patch_size", 1) ** 2  # (C, H, W) of the latents
    per_draw, per_prompt = feature_bytes(type(family), plan, hidden, n_img, text_len, target, feature_dtype)
    text = family.text_shapes()  # the prompt bank: the text encoder's output in fp32, once per prompt
    bank = ((text_len * text["encoder_hidden_states"] + text.get("pooled_projections", 0)) * 4
            + family.attention_mask_bytes(text_len))
    return {"train_memory_bytes": int(memory), "kept_params": kept_params, "lora_params": lora_params,
            "activation_bytes": int(activations), "weight_bytes": weights, "precision": precision, "quant": quant,
            "cache_bytes_per_draw": per_draw, "cache_bytes": per_draw * samples + per_prompt,
            "feature_dtype": feature_dtype, "samples": samples, "bank_bytes_per_prompt": bank,
            "assumes": f"batch 1 at {s_min}x{s_min}, {text_len} text tokens"}


def feature_bytes(family: type, plan: SkipPlan, hidden: int, n_img: int, text_len: int, target: int,
                  feature_dtype: str) -> tuple[int, int]:
    """(bytes per draw, bytes per training prompt) of the tensors `blockskip cache` stores in
    `feature_dtype` (the safetensors header, about 100 bytes a tensor, is not counted). A draw: the
    entry state, a residual per skipped span after the first kept block (image tokens only for a
    span that reaches the end), the per-draw conditioning and the target; the family (a `Family`
    class) says its state's rows and what its conditioning and prompts store. fp8 adds one fp32
    scale per token of each state tensor."""
    streams = family.state_rows(n_img, text_len)
    rows = list(streams)
    for _, end in plan.residual_spans:
        rows += [n_img] if end == plan.num_blocks else streams
    state_dtype, small_dtype = storage_dtype(feature_dtype, "entry"), storage_dtype(feature_dtype, "cond")
    scale = 4 if feature_dtype == "fp8" else 0  # fp32, per token
    states = sum(rows) * (hidden * state_dtype.itemsize + scale)
    cond, cond_extra = family.cond_values(hidden, n_img)
    per_draw = states + (cond + target) * small_dtype.itemsize + cond_extra
    prompt = family.prompt_values(hidden, text_len)
    return per_draw, prompt * storage_dtype(feature_dtype, "prompt").itemsize


def base_pack_bytes(family, plan: SkipPlan, quant: str = "none") -> int:
    """Bytes of the base pack's weights: the kept blocks' and the head's tensors as `cache` writes
    them (the model's own dtype; the kept blocks' Linear weights in `quant`), once per model and
    plan; the subject bundles hold the features."""
    tensors = [t for i in plan.kept for t in family.block(i).state_dict().values()]
    tensors += [t for name in family.head_module_names() for t in _params(family.model, name)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if quant != "none":
        for _, module in kept_linears(family, plan):
            weight = module.weight
            total += quantized_bytes(tuple(weight.shape), quant) - weight.numel() * weight.element_size()
    return total


def _params(model, name):
    obj = model.get_submodule(name) if name in dict(model.named_modules()) else getattr(model, name)
    return obj.parameters() if hasattr(obj, "parameters") else [obj]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="turn a sensitivity profile and a skip budget into a skip plan",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="profile JSON from `blockskip profile`")
    parser.add_argument("--model", required=True, help="the same model folder (or tiny-flux / tiny-sana)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--skip-ratio", type=float,
                        help="fraction of blocks to skip (paper: 0.3, 0.4, 0.5); with --board: chosen unless given")
    budget.add_argument("--skip-blocks", type=int, help="number of blocks to skip")
    parser.add_argument("--board", choices=list(BOARDS),
                        help="choose the plan for this board's usable memory (" + "; ".join(
                            f"{b.name}: {b.usable_bytes / GIB:.1f} GiB" for b in BOARDS.values()) +
                        "): the first of 30%%/50%% skipped x kept weights as they are/int8/nf4 x the training "
                        "resolution and 3/4 and 1/2 of it whose estimated peak fits; settings given are held "
                        "fixed, and a plan that cannot fit is refused naming one that would. Also says whether "
                        "and how the board can generate")
    parser.add_argument("--memory-budget", type=float, metavar="GIB",
                        help="choose the plan for this many GiB (wins over --board's usable memory)")
    parser.add_argument("--generate-size", type=int,
                        help="image side for the board's generation check (default: --s-max)")
    parser.add_argument("--max-last", type=int,
                        help="skip at most this many blocks at the end (default: no cap)")
    parser.add_argument("--paper-argmin", action="store_true",
                        help="choose the split by the paper's Dpre[n] + Dsuf[m] alone. By default a profile's "
                             "staleness term is added: stale[m] * Dpre[L], for the last m blocks' cached residual "
                             "going stale as LoRA trains the blocks before them (on the built-in crop model the 50%% "
                             "plan moves from (1, 3) to (4, 0): 0.51 -> 0.81 of LoRA's fidelity gain; "
                             "benchmarks/results/README.md)")
    parser.add_argument("--split", type=int, nargs=2, metavar=("N", "M"),
                        help="skip exactly the first N and the last M blocks (instead of --skip-ratio / "
                             "--skip-blocks; not with --board / --memory-budget)")
    parser.add_argument("--out", required=True, help="plan JSON to write")
    parser.add_argument("--s-max", type=int,
                        help="largest crop side (default: from the model: the image_size its blockskip.json "
                             "records, e.g. 32 for the built-in crop model; else for a latent-space FLUX / SANA "
                             "the paper's 512 / 1024; else the profile's generation size)")
    parser.add_argument("--s-min", type=int,
                        help="training resolution (default: half of --s-max, the paper's ratio: FLUX 512 -> 256, "
                             "SANA 1024 -> 512)")
    parser.add_argument("--schedule", default="low-to-high",
                        help="patch schedule: low-to-high (paper), high-to-low, random, resize")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="unique training draws to cache (default: %(default)s); `blockskip train` cycles "
                             "through them, a new order each pass")
    parser.add_argument("--feature-dtype", default=DEFAULT_FEATURE_DTYPE, choices=list(FEATURE_DTYPES),
                        help="how `blockskip cache` stores the features (default: %(default)s): fp32 (exact), "
                             "bf16 / fp16 (half the bytes), fp8 (e4m3 with a per-token scale: about a quarter at "
                             "FLUX.1-dev's shapes)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: what the model's blockskip.json records, "
                                                 "else 16; the built-in model: 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the model's, else 16; built-in: 8)")
    parser.add_argument("--lora-scope", choices=["attention", "all"],
                        help="LoRA on attention projections only, or on the MLPs too (default: the model's, else "
                             "attention; built-in: all)")
    parser.add_argument("--text-len", type=int,
                        help="text tokens, for the estimates (default: the max_length of the model's text "
                             "encoder, e.g. 16 for the built-in crop model; a diffusers text_encoder/ folder or none: "
                             "FLUX 512, SANA 300)")
    parser.add_argument("--precision", default="fp32", choices=sorted(BYTES),
                        help="weight and activation bytes for the memory estimate (default: fp32, the dtype of "
                             "the kept weights that `blockskip cache` writes and `blockskip train` holds; bf16 "
                             "is the paper's FLUX setting)")
    parser.add_argument("--quant", choices=list(QUANT_SCHEMES),
                        help="how the base pack stores the kept blocks' Linear weights (default: none, or with "
                             "--board the lightest the board needs): int8 (per output channel) or nf4 (4-bit "
                             "NormalFloat, blocks of 64, double-quantized absmax), quantized on the host; the board "
                             "trains LoRA on top without ever holding them in full precision. FLUX.1-dev, 50%% plan, "
                             "256 px, bf16 on one H200: kept weights 7.42 GiB -> 3.73 (int8) / 1.94 (nf4), train "
                             "peak 9.49 GiB -> 5.89 / 4.18 (benchmarks/results/train_memory_quant.md)")
    parser.set_defaults(func=run)


def make_plan(profile: dict, model, k: int, schedule, lora: LoraSettings, samples: int,
              text_len: int = 512, precision: str = "bf16", max_last: int | None = None,
              feature_dtype: str = "fp32", quant: str = "none", paper: bool = False,
              split: tuple[int, int] | None = None) -> PlanDocument:
    """Skip the first n and last m blocks, n + m = k: by the profile's score (`choose_split`: with
    the staleness term when the profile has one and not `paper`; m <= max_last when given), or
    the explicit `split`. The plan records the split, its score, the paper's argmin and a line
    saying why (`why`)."""
    family = model.family
    if profile.get("model", {}).get("config_hash") != family.config_hash():
        raise InputError("the profile was measured on another model (config hash "
                         f"{profile.get('model', {}).get('config_hash')} != {family.config_hash()})")
    stale = None if paper else profile.get("stale")
    if split is not None:
        n, m = split
        if n < 0 or m < 0 or n + m != k:
            raise ConfigError(f"split ({n}, {m}) must be two counts >= 0 adding up to the {k} skipped blocks")
        how = "given"
    else:
        n, m = choose_split(profile["d_pre"], profile["d_suf"], k, max_last, stale)
        how = ("the paper's argmin of Dpre[n] + Dsuf[m]" if stale is None else
               "argmin of Dpre[n] + Dsuf[m] + stale[m] * Dpre[L]")
        how += f", m <= {max_last}" if max_last is not None else ""
        if stale is None and not paper:
            how += " (this profile has no staleness term: `blockskip profile` measures it)"
    plan = SkipPlan.first_last(family.num_blocks, n, m)
    scores = split_scores(profile["d_pre"], profile["d_suf"], k, stale)
    extra = {"n": n, "m": m, "score": scores[n],
             "paper_split": list(choose_split(profile["d_pre"], profile["d_suf"], k)),
             "stale": profile["stale"][m] if profile.get("stale") else None,
             "why": explain_split({**profile, "stale": stale}, k, n, m, how)}
    return plan_document(model, plan, schedule, lora, samples, text_len, precision, extra, feature_dtype, quant)


def plan_document(model, plan: SkipPlan, schedule, lora: LoraSettings, samples: int, text_len: int = 512,
                  precision: str = "bf16", extra: dict | None = None, feature_dtype: str = "fp32",
                  quant: str = "none") -> PlanDocument:
    """The plan document for any skip plan (ablations use middle or one-sided plans). `feature_dtype`
    is what `blockskip cache` stores unless told otherwise (fp32 here: exact; the command line's
    default is DEFAULT_FEATURE_DTYPE); `quant` how the base pack stores the kept Linear weights."""
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if feature_dtype not in FEATURE_DTYPES:
        raise ConfigError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if quant not in QUANT_SCHEMES:
        raise ConfigError(f"quant must be one of {', '.join(QUANT_SCHEMES)}, got {quant!r}")
    family = model.family
    targets = [t for i in plan.kept for t in family.lora_targets(i, lora.scope)]
    desc = model.describe()
    return PlanDocument(
        model=desc, skip=plan, schedule=schedule, lora=lora, target_modules=tuple(targets), samples=samples,
        feature_dtype=feature_dtype, quant=quant, choice=dict(extra or {}),
        estimates={**estimate(desc, family, plan, lora, schedule.s_min, text_len, precision, feature_dtype, samples,
                              quant),
                   "base_pack_bytes": base_pack_bytes(family, plan, quant)})


def default_s_max(model, profile: dict) -> tuple[int, str]:
    """(--s-max, where it comes from) when the user gives none."""
    size = recorded_size(model)
    if size:
        return size, "the image_size in the model's blockskip.json"
    if model.codec.kind != "pixel" and model.family.paper_s_max:
        return model.family.paper_s_max, f"the paper's {model.family.name.upper()} s_max"
    size = profile.get("size") or profile.get("key", {}).get("size")
    if size:
        return int(size), "the profile's generation size"
    return PIXEL_SIZE, "a pixel-space model with no recorded size"


def default_s_min(s_max: int, granularity: int) -> int:
    """Half of s_max on the model's granularity grid (the paper: 512 -> 256, 1024 -> 512)."""
    return max(granularity, (s_max // 2) // granularity * granularity)


def default_text_len(model) -> tuple[int, str]:
    """(--text-len, where it comes from) when the user gives none."""
    encoder = model.text_encoder.config() if model.text_encoder else model.meta.get("text_encoder")
    if encoder and encoder.get("kind") in ("hash", "words"):
        return int(encoder["max_length"]), "the max_length of the model's text encoder"
    length = model.family.pipeline_text_len
    if model.path and (Path(model.path) / "text_encoder").is_dir():
        return length, f"{model.family.name.upper()}'s text encoder as blockskip runs it"
    return length, f"no text encoder in the model folder: {model.family.name.upper()}'s pipeline length"


def _size(count: float) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    profile_path = Path(args.profile)
    if not profile_path.is_file():
        raise InputError(f"profile {args.profile!r} does not exist (run `blockskip profile` first)")
    profile = json.loads(profile_path.read_text())
    model = resolve_model(args.model, text_encoder=False)
    budget = budget_from(args.board, args.memory_budget)
    if args.split is not None and (args.skip_ratio is not None or args.skip_blocks is not None or budget is not None):
        raise ConfigError("--split names the skipped blocks itself: give it without --skip-ratio, --skip-blocks, "
                          "--board and --memory-budget")
    if budget is None and args.skip_ratio is None and args.skip_blocks is None and args.split is None:
        raise ConfigError("give --skip-ratio, --skip-blocks or --split (or --board / --memory-budget to choose one)")
    taken = []
    s_max, s_min, text_len = args.s_max, args.s_min, args.text_len
    if s_max is None:
        s_max, source = default_s_max(model, profile)
        taken.append(f"--s-max {s_max} ({source})")
    if s_min is None:
        s_min = default_s_min(s_max, model.granularity)
        taken.append(f"--s-min {s_min} (half of --s-max)")
    if text_len is None:
        text_len, source = default_text_len(model)
        taken.append(f"--text-len {text_len} ({source})")
    recorded, source = LoraSettings.for_model(model)
    lora = LoraSettings(*(given if given is not None else default for given, default in
                          ((args.rank, recorded.rank), (args.alpha, recorded.alpha), (args.lora_scope, recorded.scope))))
    if taken:
        print("defaults from the model: " + ", ".join(taken))
    if None in (args.rank, args.alpha, args.lora_scope) and recorded != LoraSettings():
        print(f"LoRA from {source}: rank {lora.rank}, alpha {lora.alpha:g}, scope {lora.scope}")

    def make(ratio: float | None, quant: str, side: int) -> PlanDocument:
        blocks = sum(args.split) if args.split else args.skip_blocks
        k = skip_budget(model.family.num_blocks, ratio, None if ratio is not None else blocks)
        schedule = PatchSchedule(s_min=side, s_max=s_max, granularity=model.granularity, schedule=args.schedule)
        return make_plan(profile, model, k, schedule, lora, args.samples, text_len, args.precision,
                         max_last=args.max_last, feature_dtype=args.feature_dtype, quant=quant,
                         paper=args.paper_argmin, split=tuple(args.split) if args.split else None)

    if budget is None:
        plan = make(args.skip_ratio, args.quant or "none", s_min)
    else:
        chosen, tried = choose(make, budget, s_min, model.granularity, args.skip_ratio, args.skip_blocks is not None,
                               args.quant, args.s_min is not None)
        plan = chosen.plan
        generation, line = generation_summary(model, budget, args.generate_size or s_max, text_len)
        plan = plan.with_board({"budget": budget.source, "budget_bytes": budget.bytes,
                                "train_peak_bytes": chosen.need, "tried": [c.flags() for c in tried],
                                "generation": generation})
        heavier = len(tried) - 1
        print(f"for {budget.source}: {chosen.flags()} (est. training peak {gib(chosen.need)} with the runtime"
              + (f"; {heavier} more faithful setting{'s' * (heavier > 1)} did not fit)" if heavier else ")"))
        if line:
            print(line)
    out = plan.save(args.out)
    est = plan.estimates
    print(plan.choice["why"])
    print(f"skip first {plan.choice['n']} and last {plan.choice['m']} of {model.family.num_blocks} blocks; "
          f"est. edge training memory {_size(est['train_memory_bytes'])} ({est['precision']}, {est['assumes']}) "
          f"-> {out}")
    quant = f", Linear weights {plan.quant}" if plan.quant != "none" else ""
    print(f"base pack {_size(est['base_pack_bytes'])} (kept weights{quant}, installed once per model and plan)")
    print(f"subject bundle: features {_size(est['cache_bytes'])} ({plan.samples} draws x "
          f"{_size(est['cache_bytes_per_draw'])}, {plan.feature_dtype}) + prompt bank "
          f"{_size(est['bank_bytes_per_prompt'])} per prompt")
    return 0

"""Personalization quality on held-out crop-leaf subjects: the small-scale counterpart of the
paper's DreamBench table, measured on the built-in pretrained crop model (models/crops.py).

For each subject (an attribute combination the base model never saw in pretraining), render a
few subject photos at 32 px (the model's native size), then per method: plan -> cache (frozen full model) -> bundle ->
train LoRA on the edge path (its own process, tensor memory tracked) -> load the adapter into the full
model -> generate the identifier prompt and context prompts at 32 px -> score.

Methods: LoRA on the full model at full resolution (32 px, whole image; the paper's 512 for
FLUX); patch sampling only (crops 32 -> 16 px, all blocks; the paper's 512 -> 256); DiT-BlockSkip 30% / 50%
(first n + last m as `blockskip plan` chooses them from the profile, patch sampling); DiT-BlockSkip 50% by the
paper's argmin of Dpre + Dsuf alone (`blockskip plan --paper-argmin`); skip-first-only and skip-last-only
50%; DiT-BlockSkip 50% without residuals; HollowedNet-style (skip the middle 50%). Asked for by name only
(`--methods`): DiT-BlockSkip 50% + int8 / + NF4 (the kept blocks' Linear weights quantized in the
base pack, `blockskip plan --quant`).

Metrics: subject fidelity = mean cosine similarity of EfficientNet-Lite0 embeddings between
generated and subject images (DINO stand-in); attribute accuracy = the attribute classifier's
agreement with the subject's shape, colour and pattern (both over the identifier prompt and it on
each background); context accuracy = the share of images of "a photo of sks <colour> leaf with
<pattern> on <background>" (a colour and a lesion pattern other than the subject's, one prompt per
background) in which the classifier sees all three as prompted (CLIP-T stand-in: whether the
adapter still lets the prompt change the subject and its place); peak training memory: the peak of live tensor bytes
in the training process (blockskip.memory.TensorMemory: weights read, LoRA parameters, gradients,
AdamW moments, saved activations, temporaries; what torch.cuda.max_memory_allocated counts on a
GPU). The process RSS is not used: on a CPU it is ~480 MiB of interpreter and libraries for every
method, which hides a few-MiB model. Mean and spread over training seeds and subjects.

    python benchmarks/quality.py --out benchmarks/results           # the table and grid
    python benchmarks/quality.py --quick                            # a smoke run
    python benchmarks/quality.py --threads 1 --methods "LoRA (full model, 32 px)" "DiT-BlockSkip 30%" \
        "DiT-BlockSkip 50%" --out benchmarks/results/plan-choice  # the plan that weighs staleness
    python benchmarks/quality.py --methods "LoRA (full model, 32 px)" "DiT-BlockSkip 50%" \
        --feature-dtypes fp32 bf16 fp8 --samples 240 60 30 --out benchmarks/results/feature-storage
                                    # feature storage: a row per storage and draw count, and a table
                                    # of each against the first, paired by subject and seed
    python benchmarks/quality.py --methods "LoRA (full model, 32 px)" "DiT-BlockSkip 50%" \
        "DiT-BlockSkip 50% + int8" "DiT-BlockSkip 50% + NF4" --out benchmarks/results/quant-quality
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

IDENTIFIER = "a photo of sks leaf"
CLASS_PROMPT = "a photo of a leaf"  # prior preservation's class prompt (no identifier)
# Personalization subjects: every shape / colour / pattern combination held out of pretraining
# (models/crops.py HELD_OUT_RULES: the red heart leaf with stripes, and purple leaves with rings in
# each of the five shapes). The first two are the ones the plan choice was tuned on (benchmarks/
# results/plan-choice); the other four were never used to tune anything.
SUBJECTS = [{"shape": "heart", "colour": "red", "pattern": "stripes"},
            {"shape": "oval", "colour": "purple", "pattern": "rings"},
            {"shape": "round", "colour": "purple", "pattern": "rings"},
            {"shape": "lance", "colour": "purple", "pattern": "rings"},
            {"shape": "heart", "colour": "purple", "pattern": "rings"},
            {"shape": "lobed", "colour": "purple", "pattern": "rings"}]
TUNED_ON = (0, 1)  # subjects the plan choice was tuned on
# name: (plan kind, skip ratio, patch schedule (s_min, s_max, schedule), use residuals)
METHODS = {
    "LoRA (full model, 32 px)": ("none", 0.0, (32, 32, "resize"), True),
    "patch sampling only": ("none", 0.0, (16, 32, "low-to-high"), True),
    "DiT-BlockSkip 30%": ("profile", 0.3, (16, 32, "low-to-high"), True),
    "DiT-BlockSkip 50%": ("profile", 0.5, (16, 32, "low-to-high"), True),
    "DiT-BlockSkip 50%, paper's argmin": ("paper", 0.5, (16, 32, "low-to-high"), True),
    "skip first 50% only": ("first", 0.5, (16, 32, "low-to-high"), True),
    "skip last 50% only": ("last", 0.5, (16, 32, "low-to-high"), True),
    "BlockSkip 50%, no residuals": ("profile", 0.5, (16, 32, "low-to-high"), False),
    "HollowedNet-style (middle 50%)": ("middle", 0.5, (16, 32, "low-to-high"), True),
    "DiT-BlockSkip 50% + int8": ("profile", 0.5, (16, 32, "low-to-high"), True),
    "DiT-BlockSkip 50% + NF4": ("profile", 0.5, (16, 32, "low-to-high"), True),
}
# methods whose kept blocks' Linear weights the base pack ships quantized (`blockskip plan --quant`)
QUANT = {"DiT-BlockSkip 50% + int8": "int8", "DiT-BlockSkip 50% + NF4": "nf4"}
# Training runs in its own process (as on the edge: only what the bundle holds), with its tensor
# memory tracked (TrainConfig.track_memory).
TRAIN_CHILD = """
import json, sys
from pathlib import Path
import torch
from blockskip.edge.train import TrainConfig, train
from blockskip.bundle import TrustPolicy
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
trust = TrustPolicy(allow_unsigned=True)  # bundles this script built a moment ago, on this machine
print(json.dumps({"result": train(Path(args["bundle"]), Path(args["out"]), TrainConfig(**args["config"]), trust=trust)}))
"""


def skip_plan(kind: str, ratio: float, num_blocks: int, profile: dict):
    from blockskip.host.plan import choose_split, skip_budget
    from blockskip.models.skip import SkipPlan

    k = skip_budget(num_blocks, ratio)
    if kind == "none" or k == 0:
        return SkipPlan(num_blocks, ())
    if kind in ("profile", "paper"):  # `blockskip plan`'s default, and its --paper-argmin
        stale = profile["stale"] if kind == "profile" else None
        return SkipPlan.first_last(num_blocks, *choose_split(profile["d_pre"], profile["d_suf"], k, stale=stale))
    if kind == "first":
        return SkipPlan.first_last(num_blocks, k, 0)
    if kind == "last":
        return SkipPlan.first_last(num_blocks, 0, k)
    start = (num_blocks - k) // 2  # middle
    return SkipPlan.from_blocks(num_blocks, range(start, start + k))


def train_adapter(model, plan, schedule, photos, work: Path, seed: int, args, use_residuals: bool,
                  feature_dtype: str = "fp32", samples: int = 64, quant: str = "none", prior_weight: float = 0.0,
                  captions: dict[str, str] | None = None, track_memory: bool = True) -> dict:
    """Plan -> `prepare` (the host's pipeline: cache, class images and their draws when
    `prior_weight` > 0, a single bundle) -> `train` in its own process."""
    from blockskip.host.plan import LoraSettings, plan_document
    from blockskip.host.prepare import PrepareSettings, prepare
    from blockskip.host.prior import PriorSettings

    plan_doc = plan_document(model, plan, schedule, LoraSettings(rank=args.rank, alpha=args.rank, scope="all"),
                             samples, text_len=model.text_encoder.max_length, precision="fp32",
                             feature_dtype=feature_dtype, quant=quant)
    prior = PriorSettings(CLASS_PROMPT, images=args.prior_images, steps=args.sample_steps) if prior_weight else None
    done = prepare(model, plan_doc, photos, [IDENTIFIER], work / "bundle", single=True, captions=captions,
                   settings=PrepareSettings(seed=seed, shard_size=64, prior=prior), progress=False)
    config = {"steps": args.steps, "grad_accum": args.grad_accum, "lr": args.lr, "seed": seed,
              "checkpoint_every": 0, "use_residuals": use_residuals, "track_memory": track_memory, "device": "cpu",
              "prior_weight": prior_weight}
    proc = subprocess.run([sys.executable, "-c", TRAIN_CHILD,
                           json.dumps({"bundle": str(done.subject), "out": str(work / "adapter"), "config": config,
                                       "threads": args.threads})],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**child, "peak_tensor_bytes": child["result"].get("peak_tensor_bytes"), "adapter": work / "adapter",
            "kept": len(plan.kept), "estimate": plan_doc.estimates["train_memory_bytes"]}


def context_prompts(subject: dict, backgrounds: list[str]) -> list[tuple[str, dict]]:
    """(prompt, what it asks for) per background: the subject in another colour and with another
    lesion pattern on that background, e.g. "a photo of sks green leaf with spots on soil"."""
    from blockskip.models.crops import ATTRIBUTES

    colours = [c for c in ATTRIBUTES["colour"] if c != subject["colour"]]
    patterns = [p for p in ATTRIBUTES["pattern"] if p not in (subject["pattern"], "none")]
    asked = [{"colour": colours[i % len(colours)], "pattern": patterns[i % len(patterns)], "background": bg}
             for i, bg in enumerate(backgrounds)]
    return [(f"a photo of sks {a['colour']} leaf with {a['pattern']} on {a['background']}", a) for a in asked]


def diversity(embeddings: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cos) between the embeddings of one prompt's images."""
    normed = torch.nn.functional.normalize(embeddings, dim=-1)
    cos = normed @ normed.T
    n = cos.shape[0]
    return float((1 - cos)[~torch.eye(n, dtype=torch.bool)].mean()) if n > 1 else 0.0


@torch.no_grad()
def evaluate(new_model, adapter, subject: dict, photos, encoder, classifier, backgrounds, args) -> dict:
    """Fidelity and attributes over the identifier prompt and it on each background; the context
    columns, scored apart: recontextualization (the subject on the background the prompt names:
    "a photo of sks leaf on sky"), property change (the colour and pattern the prompt names:
    "a photo of sks green leaf with spots on soil", see context_prompts), and the old combined
    context accuracy (colour, pattern and background all as prompted); diversity: mean pairwise
    embedding distance within each prompt's images."""
    from blockskip.edge.lora import load_adapter
    from blockskip.models.crops import ATTRIBUTES
    from blockskip.models.pipeline import sample

    model = new_model()
    if adapter is not None:
        load_adapter(model.family.model, adapter)
    prompts = [IDENTIFIER] + [f"{IDENTIFIER} on {bg}" for bg in backgrounds]
    contexts = context_prompts(subject, backgrounds)

    def generate(prompt: str, p: int) -> torch.Tensor:
        text = model.encode_text(prompt)
        return torch.cat([sample(model, text, seed=1000 * p + i, steps=args.sample_steps, height=32, width=32)
                          for i in range(args.images)])

    sets = [generate(prompt, p) for p, prompt in enumerate(prompts)]
    batch = torch.cat(sets)
    references = torch.cat([_to_tensor(Image.open(path)) for path in photos])
    gen_emb = encoder.embed(batch)
    ref_emb = encoder.embed(references)
    fidelity = torch.nn.functional.cosine_similarity(gen_emb[:, None], ref_emb[None], dim=-1).mean().item()
    predicted = classifier.predict(batch)
    attribute_hits = []
    for attr in ("shape", "colour", "pattern"):
        target = ATTRIBUTES[attr].index(subject[attr])
        attribute_hits.append((predicted[attr] == target).float().mean().item())
    recontext_hits = []
    for p, (prompt, images) in enumerate(zip(prompts[1:], sets[1:])):
        seen = classifier.predict(images)["background"]
        recontext_hits += (seen == ATTRIBUTES["background"].index(backgrounds[p])).tolist()
    context_hits, property_hits, context_sets = [], [], []
    for c, (prompt, asked) in enumerate(contexts):
        images = generate(prompt, len(prompts) + c)
        context_sets.append(images)
        seen = classifier.predict(images)
        prop = torch.ones(args.images, dtype=torch.bool)
        for attr in ("colour", "pattern"):
            prop &= seen[attr] == ATTRIBUTES[attr].index(asked[attr])
        property_hits += prop.tolist()
        context_hits += (prop & (seen["background"] == ATTRIBUTES["background"].index(asked["background"]))).tolist()
    spread = [diversity(encoder.embed(images)) for images in sets + context_sets]
    return {"fidelity": fidelity, "attributes": sum(attribute_hits) / 3,
            "recontext": sum(recontext_hits) / len(recontext_hits), "property": sum(property_hits) / len(property_hits),
            "context": sum(context_hits) / len(context_hits), "diversity": sum(spread) / len(spread),
            "images": batch, "context_images": torch.cat(context_sets)}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    from blockskip.host.patches import to_tensor

    return to_tensor(image.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS))[None]


def _grid(rows: dict[str, torch.Tensor], out: Path, per_row: int = 8, scale: int = 2,
          headers: list[str] | None = None) -> Path:
    """A sheet of the rows' images, each row named on its left; `headers` name equal groups of columns."""
    from PIL import ImageDraw

    from blockskip.edge.generate import to_pil

    cell = 32 * scale
    sheet = Image.new("RGB", (cell * per_row, cell * len(rows)), "white")
    for r, images in enumerate(rows.values()):
        for c, image in enumerate(images[:per_row]):
            sheet.paste(to_pil(image).resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * cell))
    labelled = label_rows(sheet, list(rows), cell)
    if headers:
        band = 16
        framed = Image.new("RGB", (labelled.width, labelled.height + band), "white")
        framed.paste(labelled, (0, band))
        draw = ImageDraw.Draw(framed)
        group = sheet.width // len(headers)
        for i, text in enumerate(headers):
            draw.text((labelled.width - sheet.width + i * group + 4, 2), text, fill="black")
        labelled = framed
    labelled.save(out)
    return out


def label_rows(sheet: Image.Image, names: list[str], cell: int, width: int = 230) -> Image.Image:
    """The sheet with each row's name written in a white column on its left."""
    from PIL import ImageDraw

    labelled = Image.new("RGB", (width + sheet.width, sheet.height), "white")
    labelled.paste(sheet, (width, 0))
    draw = ImageDraw.Draw(labelled)
    for r, name in enumerate(names):
        draw.text((6, r * cell + cell // 2 - 6), name, fill="black")
    return labelled


def summarize(scores: list[dict], key: str) -> str:
    values = [s[key] for s in scores]
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def storage_table(variants: dict, scores: dict, reference: tuple, base_fidelity: float,
                  lora_gain: float) -> list[str]:
    """Each storage row against its method's `reference` storage (feature dtype, draws), paired by
    subject and seed: the same photos, seed and steps, so the seed-to-seed spread of the table
    cancels and what is left is what the storage changes (and what the changed data order does)."""
    lines = ["", f"Feature storage against {reference[0]} with {reference[1]} draws, paired by subject and seed "
             "(differences in units of LoRA's fidelity gain):", "",
             "| method | storage | draws | fidelity gain vs LoRA | minus the reference's: mean | min | max |",
             "|---|---|---|---|---|---|---|"]
    references = {method: scores[row] for row, (method, feature_dtype, samples) in variants.items()
                  if (feature_dtype, samples) == reference}
    for row, (method, feature_dtype, samples) in variants.items():
        if method not in references or not scores[row]:
            continue
        paired = {(r["subject"], r["seed"]): r["fidelity"] for r in references[method]}
        deltas = [(r["fidelity"] - paired[(r["subject"], r["seed"])]) / lora_gain for r in scores[row]]
        gain = (statistics.mean(r["fidelity"] for r in scores[row]) - base_fidelity) / lora_gain
        lines.append(f"| {method} | {feature_dtype} | {samples} | {gain:.2f} | {statistics.mean(deltas):+.2f} | "
                     f"{min(deltas):+.2f} | {max(deltas):+.2f} |")
    return lines


def paired_interval(rows: list[dict], lora_rows: list[dict], base: dict[int, float], draws: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """The fidelity gain vs LoRA, mean(method - base) / mean(LoRA - base) over the (subject, seed)
    units both ran, and its 95% paired bootstrap interval (units resampled with replacement)."""
    import numpy as np

    lora = {(r["subject"], r["seed"]): r["fidelity"] for r in lora_rows}
    units = [(r["fidelity"] - base[r["subject"]], lora[(r["subject"], r["seed"])] - base[r["subject"]])
             for r in rows if (r["subject"], r["seed"]) in lora]
    if not units:
        return float("nan"), float("nan"), float("nan")
    gains = np.array(units)
    point = gains[:, 0].mean() / gains[:, 1].mean()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(gains), size=(draws, len(gains)))
    sampled = gains[picks].mean(axis=1)
    ratios = sampled[:, 0] / sampled[:, 1]
    return float(point), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def per_subject_vs_base(rows: list[dict], base_rows: list[dict], key: str) -> tuple[float, float]:
    """(mean, worst) over subjects of the method's `key` score / the base model's on the same prompts."""
    base = {r["subject"]: r[key] for r in base_rows}
    ratios = []
    for subject in sorted({r["subject"] for r in rows}):
        mine = statistics.mean(r[key] for r in rows if r["subject"] == subject)
        ratios.append(mine / base[subject] if base[subject] > 0 else float("nan"))
    return statistics.mean(ratios), min(ratios)


def report(scores: dict[str, list[dict]], variants: dict[str, tuple], args, subjects: list[dict], num_blocks: int,
           storages: list[tuple]) -> tuple[list[str], dict]:
    """The table (markdown lines) and its JSON from the scored rows; the same for one run and for
    `--merge` of several."""
    from blockskip.models.crops import caption

    lora_name = "LoRA (full model, 32 px)"
    chosen = {i: x for i, x in enumerate(subjects)}
    base_rows = scores["base model (no adapter)"]
    base_by_subject = {r["subject"]: r["fidelity"] for r in base_rows}
    base_fidelity = statistics.mean(r["fidelity"] for r in base_rows)
    
    def lora_of(row: str) -> str:
        """The LoRA row trained with the same recipe (prior weight, captions) as `row`."""
        _, _, _, weight, captioned = variants[row]
        return next((r for r, v in variants.items() if v[0] == lora_name and v[3:] == (weight, captioned)), lora_name)
    
    def mean_memory(rows):
        values = [r["memory"] for r in rows if r.get("memory")]
        return statistics.mean(values) if values else None
    
    lines = [f"Model: {args.model or 'the built-in crop model (models/weights/crop-flux)'}, "
             f"{num_blocks} blocks. Subjects ({len(chosen)}, every combination held out of pretraining; "
             f"the plan choice was tuned on the first two only): "
             f"{', '.join(caption(s) for s in chosen.values())}; {args.photos} photos each; {args.seeds} training "
             f"seeds ({args.first_seed}-{args.first_seed + args.seeds - 1}); {args.steps} steps x {args.grad_accum}; "
             f"features {', '.join(args.feature_dtypes)}, {', '.join(map(str, args.samples))} cached draws; "
             f"{args.images} images per prompt. Prior: {args.prior_images} class images of {CLASS_PROMPT!r} from the "
             f"frozen model, as many prior draws as subject draws. Captions: 'a photo of sks leaf on <its "
             f"background>' per photo.", "",
             "Columns: fidelity = mean EfficientNet-Lite0 cosine to the subject photos over the identifier prompt and "
             "it on each background; gain vs LoRA = mean(method - base) / mean(LoRA - base) over subjects x seeds, "
             "paired with the LoRA run of the same subject and seed (trained with the same prior weight and captions "
             "where that row exists, else plain LoRA), with its 95% paired bootstrap interval; "
             "recontext. = the background as prompted ('a photo of sks leaf on sky'); property = colour and pattern "
             "as prompted ('a photo of sks green leaf with spots on soil'); each also as the method's score / the "
             "base model's on the same subject's prompts, mean and worst subject; diversity = mean pairwise "
             "embedding distance within a prompt's images; peak train MiB = live tensors (first subject, first "
             "seed).", "",
             "| method | kept blocks | fidelity | gain vs LoRA [95% CI] | fidelity vs LoRA | attribute acc. | "
             "recontext. | vs base (mean / worst) | property | vs base (mean / worst) | diversity | "
             "peak train MiB | vs LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for name, rows in scores.items():
        if not rows:
            continue
        fidelity = statistics.mean(r["fidelity"] for r in rows)
        kept = rows[0].get("kept", num_blocks)
        if name in variants:
            reference = scores[lora_of(name)]
            gain, low, high = paired_interval(rows, reference, base_by_subject)
            ratio = fidelity / statistics.mean(r["fidelity"] for r in reference)
            memory, lora_memory = mean_memory(rows), mean_memory(scores[lora_name])
        else:
            gain = low = high = 0.0
            ratio = fidelity / statistics.mean(r["fidelity"] for r in scores[lora_name]) if scores.get(lora_name) \
                else float("nan")
            memory = lora_memory = None
        recontext_vs, recontext_worst = per_subject_vs_base(rows, base_rows, "recontext")
        property_vs, property_worst = per_subject_vs_base(rows, base_rows, "property")
        lines.append(
            f"| {name} | {kept} | {summarize(rows, 'fidelity')} | {gain:.2f} [{low:.2f}, {high:.2f}] | {ratio:.2f} | "
            f"{summarize(rows, 'attributes')} | {summarize(rows, 'recontext')} | {recontext_vs:.2f} / "
            f"{recontext_worst:.2f} | {summarize(rows, 'property')} | {property_vs:.2f} / {property_worst:.2f} | "
            f"{summarize(rows, 'diversity')} | {memory / 2**20 if memory else 0:.1f} | "
            f"{memory / lora_memory if memory and lora_memory else 0:.2f} |")
        table[name] = {"fidelity": fidelity, "gain_vs_lora": gain, "gain_interval": [low, high],
                       "fidelity_vs_lora": ratio, "memory": memory,
                       "recontext": statistics.mean(r["recontext"] for r in rows),
                       "property": statistics.mean(r["property"] for r in rows),
                       "recontext_vs_base": [recontext_vs, recontext_worst],
                       "property_vs_base": [property_vs, property_worst],
                       "diversity": statistics.mean(r["diversity"] for r in rows),
                       "rows": [{k: v for k, v in r.items() if k not in ("images", "context_images")} for r in rows]}
    if len(storages) > 1 and scores.get(lora_name):
        lora_gain = statistics.mean(r["fidelity"] for r in scores[lora_name]) - base_fidelity
        storage_variants = {row: v[:3] for row, v in variants.items()}
        lines += storage_table(storage_variants, scores, storages[0], base_fidelity, lora_gain)
    return lines, table


def merge(paths: list[Path], out: Path) -> int:
    """quality.md / quality.json over the subjects of several runs' quality.json."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    scores: dict[str, list[dict]] = {}
    variants: dict[str, tuple] = {}
    for run in runs:
        variants.update({row: tuple(v) for row, v in run["variants"].items()})
        for row, entry in run["table"].items():
            scores.setdefault(row, []).extend(entry["rows"])
    subjects = sorted({s for run in runs for s in run["subjects"]})
    first = runs[0]
    args = argparse.Namespace(**{**first["args"], "seeds": first["args"]["seeds"]})
    lines, table = report(scores, variants, args, [SUBJECTS[i] for i in subjects], first["num_blocks"],
                          [tuple(x) for x in first["storages"]])
    lines[0] = lines[0].replace("Model:", f"Merged from {', '.join(str(p) for p in paths)}. Model:", 1)
    untuned = [s for s in subjects if s not in TUNED_ON]
    if untuned and len(untuned) < len(subjects):  # the same table on the subjects nothing was tuned on
        only = {row: [r for r in rows if r["subject"] in untuned] for row, rows in scores.items()}
        more, table["untuned"] = report(only, variants, args, [SUBJECTS[i] for i in untuned], first["num_blocks"],
                                        [tuple(x) for x in first["storages"]])
        start = next(i for i, line in enumerate(more) if line.startswith("| method"))
        lines += ["", f"### Only the subjects nothing was tuned on ({', '.join(map(str, untuned))})", ""] + more[start:]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    (out / "quality.json").write_text(json.dumps({"args": first["args"], "merged": [str(p) for p in paths],
                                                  "table": table, "variants": variants, "subjects": subjects},
                                                 indent=2, default=str))
    print("\n".join(lines))
    return 0


def main() -> int:
    from blockskip.errors import InputError
    from blockskip.features import FEATURE_DTYPES
    from blockskip.host.encoders import EfficientNetLite0
    from blockskip.host.patches import PatchSchedule
    from blockskip.host.profile import masking_profile
    from blockskip.models.crops import ATTRIBUTES, caption, is_held_out, load_classifier, load_crop_model, render

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for quality.md, quality.png, quality.json")
    parser.add_argument("--model", type=Path, help="a crop model folder from benchmarks/pretrain_crops.py "
                        "(default: the built-in models/weights/crop-flux)")
    parser.add_argument("--seeds", type=int, default=4, help="training seeds per subject and method (default: 4)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first training seed (default: %(default)s)")
    parser.add_argument("--photos", type=int, default=5, help="subject photos (4-6)")
    parser.add_argument("--samples", type=int, nargs="+", default=[64],
                        help="cached (unique) training draws; training cycles through them (default: 64). "
                             "Several values: a row per value for every method but LoRA")
    parser.add_argument("--feature-dtypes", nargs="+", default=["fp32"], choices=list(FEATURE_DTYPES),
                        help="feature storage (default: fp32). Several values: a row per value for every method "
                             "but LoRA, which runs once, with the first --feature-dtypes and --samples values, as "
                             "the reference of the gain column")
    parser.add_argument("--prior-weights", type=float, nargs="+", default=[0.0],
                        help="prior preservation weights (`train --prior-weight`; 0: none): a row per method and "
                             "weight (default: 0)")
    parser.add_argument("--prior-methods", nargs="*",
                        help="the methods that get the --prior-weights rows above 0 (default: every method)")
    parser.add_argument("--prior-images", type=int, default=8,
                        help=f"class images of {CLASS_PROMPT!r} the host generates for the prior (default: 8)")
    parser.add_argument("--captions", choices=["off", "on", "both"], default="off",
                        help="per-photo captions naming each photo's background ('a photo of sks leaf on soil') "
                             "instead of the one identifier prompt: off, on, or both as separate rows")
    parser.add_argument("--steps", type=int, default=120, help="training steps")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="generated images per prompt")
    parser.add_argument("--sample-steps", type=int, default=12)
    parser.add_argument("--methods", nargs="*",
                        help="method names (default: all but the quantized ones, which are asked for by name)")
    parser.add_argument("--subjects", nargs="*", type=int, help="subset of SUBJECTS by index (default: all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads here and in each training process (default: %(default)s; 1 where other "
                             "jobs share the cores: two threads on two busy cores ran 20x slower than one)")
    parser.add_argument("--memory-all", action="store_true",
                        help="track training memory on every run (default: the first subject's first seed per row; "
                             "the peak depends on shapes, not on data, and tracking triples training time)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="no training: one table from the quality.json of several runs with the same settings "
                             "over other subjects (e.g. two processes, --subjects 0 1 2 and 3 4 5), into --out")
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps: a smoke run")
    parser.add_argument("--no-patch-sampling", action="store_true",
                        help="every method trains on whole images at 32 px: block skipping alone")
    args = parser.parse_args()
    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if any(not 0 <= i < len(SUBJECTS) for i in args.subjects or ()):
        parser.error(f"--subjects takes indices 0 to {len(SUBJECTS) - 1}, got {args.subjects}")
    if any(w < 0 for w in args.prior_weights):
        parser.error("--prior-weights must be >= 0")
    assert all(is_held_out({**x, "background": "soil"}) for x in SUBJECTS), "a subject is not held out"
    if args.quick:
        args.seeds, args.steps, args.samples, args.images, args.sample_steps = 1, 10, [8], 2, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    try:
        base = load_crop_model(args.model)
    except InputError as exc:
        parser.error(str(exc))

    def fresh_base():  # a clean model to load one adapter into
        return copy.deepcopy(base)

    chosen = {i: x for i, x in enumerate(SUBJECTS) if not args.subjects or i in args.subjects}
    encoder, classifier = EfficientNetLite0(), load_classifier()
    backgrounds = list(ATTRIBUTES["background"])
    print("profiling the base model ...", flush=True)
    profile = masking_profile(base, encoder, [caption(s) for s in SUBJECTS[:2]] + ["a green oval leaf on soil"],
                              [0], steps=8, size=32, progress=False)
    methods = {k: v for k, v in METHODS.items() if (k in args.methods if args.methods else k not in QUANT)}
    if args.no_patch_sampling:
        methods = {k: (kind, ratio, (32, 32, "resize"), residuals)
                   for k, (kind, ratio, _, residuals) in methods.items() if k != "patch sampling only"}
    lora_name = "LoRA (full model, 32 px)"
    storages = [(d, n) for d in args.feature_dtypes for n in args.samples]
    recipes = [(w, c) for c in ({"off": [False], "on": [True], "both": [False, True]}[args.captions])
               for w in args.prior_weights]
    variants = {}  # row name: (method name, feature dtype, cached draws, prior weight, captions)
    for weight, captioned in recipes:
        suffix = (f", prior {weight:g}" if weight else "") + (", captions" if captioned else "")
        for name, method in methods.items():
            if weight and args.prior_methods is not None and name not in args.prior_methods:
                continue
            for feature_dtype, samples in storages[:1] if name == lora_name else storages:
                row = name if len(storages) == 1 or name == lora_name else f"{name} ({feature_dtype}, {samples} draws)"
                variants[row + suffix] = (name, feature_dtype, samples, weight, captioned)
    scores: dict[str, list[dict]] = {"base model (no adapter)": [], **{row: [] for row in variants}}
    grid_rows: dict[str, torch.Tensor] = {}
    context_grids: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s, subject in chosen.items():
            photo_dir = Path(tmp) / f"subject{s}"
            photo_dir.mkdir()
            photos, captions = [], {}
            for i in range(args.photos):
                attrs = {**subject, "background": backgrounds[i % len(backgrounds)]}
                photos.append(photo_dir / f"{i}.png")
                render(attrs, seed=100 * s + i, size=32).save(photos[-1])
                captions[photos[-1].name] = f"{IDENTIFIER} on {attrs['background']}"
            result = evaluate(fresh_base, None, subject, photos, encoder, classifier, backgrounds, args)
            result.update(subject=s)
            scores["base model (no adapter)"].append(result)
            grid_rows.setdefault("subject photos", torch.cat([_to_tensor(Image.open(p)) for p in photos]))
            grid_rows.setdefault("base model (no adapter)", result["images"])
            context_grids.setdefault("base model (no adapter)", result["context_images"])
            for name, (method, feature_dtype, samples, weight, captioned) in variants.items():
                kind, ratio, (s_min, s_max, schedule_name), use_residuals = methods[method]
                plan = skip_plan(kind, ratio, base.family.num_blocks, profile)
                schedule = PatchSchedule(s_min=s_min, s_max=s_max, granularity=base.granularity,
                                         schedule=schedule_name)
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    work = Path(tmp) / f"s{s}-{abs(hash(name))}-{seed}"
                    track = args.memory_all or (s == min(chosen) and seed == args.first_seed)
                    trained = train_adapter(base, plan, schedule, photos, work, seed, args, use_residuals,
                                            feature_dtype, samples, QUANT.get(method, "none"), weight,
                                            captions if captioned else None, track)
                    result = evaluate(fresh_base, trained["adapter"], subject, photos, encoder, classifier,
                                      backgrounds, args)
                    result.update(memory=trained["peak_tensor_bytes"], kept=trained["kept"], plan=plan.skipped,
                                  estimate=trained["estimate"], feature_dtype=feature_dtype, samples=samples,
                                  subject=s, seed=seed, prior_weight=weight, captions=captioned)
                    scores[name].append(result)
                    if seed == args.first_seed and name not in grid_rows:  # the first subject run
                        grid_rows[name] = result["images"]
                        context_grids[name] = result["context_images"]
                    memory = f"memory {result['memory'] / 2**20:.1f} MiB  " if result["memory"] else ""
                    print(f"{name:40s} subject {s} seed {seed}: fidelity {result['fidelity']:.3f} "
                          f"attributes {result['attributes']:.2f} recontext {result['recontext']:.2f} "
                          f"property {result['property']:.2f} diversity {result['diversity']:.3f} "
                          f"{memory}[{time.perf_counter() - started:.0f}s]", flush=True)
            # what is done so far, after every subject: a run stopped later still leaves its rows
            done = [i for i in chosen if i <= s]
            _, partial = report(scores, variants, args, [SUBJECTS[i] for i in done], base.family.num_blocks, storages)
            (out / "quality.partial.json").write_text(json.dumps(
                {"args": vars(args), "table": partial, "variants": variants, "subjects": done, "storages": storages,
                 "num_blocks": base.family.num_blocks}, indent=2, default=str))
    lines, table = report(scores, variants, args, [SUBJECTS[i] for i in chosen], base.family.num_blocks, storages)
    text = "\n".join(lines)
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "profile": profile, "table": table,
                                                  "variants": variants, "subjects": sorted(chosen),
                                                  "storages": storages, "num_blocks": base.family.num_blocks},
                                                 indent=2, default=str))
    _grid(grid_rows, out / "quality.png")
    contexts = context_prompts(next(iter(chosen.values())), backgrounds)
    _grid(context_grids, out / "quality-context.png", per_row=len(contexts) * args.images,
          headers=[f"{a['colour']}, {a['pattern']}, {a['background']}" for _, a in contexts])
    print(text)
    print(f"grids: {out / 'quality.png'}, {out / 'quality-context.png'} (context prompts of the first subject, "
          f"first seed: {'; '.join(p for p, _ in contexts)})  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

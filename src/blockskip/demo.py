"""`blockskip demo`: the whole pipeline end to end on the built-in model; no downloads, no GPU.

The built-in model is a small FLUX-family text-to-image model pretrained on procedural crop-leaf
images (models/crops.py, models/CROPS.md). The subject is a leaf it never saw in pretraining (a
red heart-shaped leaf with stripes). Steps, each with progress: subject photos (or your --images
folder), profile (cross-attention masking sensitivity; committed for the built-in model,
models/weights/crop-profile.json, and used while the weights and settings match), plan (50% skip),
cache (frozen full model, one pass per draw), base pack and subject bundle (both signed) and
verify, train LoRA on the kept blocks only (the edge path), then generate before/after images
through ONNX Runtime. Writes a report folder: report.html (one page embedding everything:
attribute scores against chance and the base model, every sample with its prompt and seed, the
loss curve, memory, seconds per stage, the two bundles' sizes), report.json, loss.png and the
images as PNG files.

The arguments are checked before any work. The report folder must be new or empty; a folder
left by an interrupted or failed demo run (it holds demo-run.json but no report.html) is cleared
and reused, a finished report is never overwritten.

`--model tiny-flux` / `tiny-sana` run the same steps on random tiny models instead (their
images are noise; they show the mechanics only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from PIL import Image

from blockskip.errors import ConfigError, InputError
# The built-in model's committed profile (the host worker serving that model uses it too).
from blockskip.models.crops import PROFILE_FILE, PROFILE_PROMPTS, cached_profile, profile_key, profile_settings

PROMPT = "a photo of sks leaf"
BANK = [*PROFILE_PROMPTS, "a photo of sks leaf on sky"]
SUBJECT = {"shape": "heart", "colour": "red", "pattern": "stripes"}  # held out of pretraining
SAMPLE_STEPS, SAMPLE_COUNT = 12, 2  # Euler steps per image; seeds per prompt
MARKER = "demo-run.json"  # written first: marks a folder as the demo's own, finished or not
# What a demo run writes into its folder: an unfinished run's folder holding only these is cleared.
DEMO_ENTRIES = {MARKER, "model", "subject", "profile.json", "plan.json", "staging", "host.key", "host.pub",
                "bundle", "bundle.inuse", "base-pack", "base-pack.inuse", "adapter", "before", "after", "engines",
                "dataset", "report.json", "loss.png", "report.html.tmp"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the end-to-end demo on the built-in crop-leaf model (CPU, offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="blockskip-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--images", help="folder of subject photos (default: generate a procedural leaf set)")
    parser.add_argument("--model", default="builtin", choices=["builtin", "tiny-flux", "tiny-sana"],
                        help="builtin: the pretrained crop-leaf model; tiny-*: random tiny models")
    parser.add_argument("--skip-ratio", type=float, default=0.5,
                        help="fraction of blocks to skip, in [0, 1) (default: %(default)s)")
    parser.add_argument("--max-last", type=int,
                        help="skip at most this many blocks at the end (see `blockskip plan --help`; default: "
                             "no cap, the plan already weighs how stale the last blocks' cached residual gets)")
    parser.add_argument("--samples", type=int, default=64, help="cached training draws (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="generation size and largest crop in pixels")
    parser.add_argument("--train-size", type=int,
                        help="training resolution s_min (default: --size, whole images). 16 turns on the paper's "
                             "patch sampling (crops 32 -> 16 px; the built-in model was pretrained on such "
                             "patches too): about half the training memory (9.8 vs 17.7 MiB of tensors), some "
                             "fidelity lost (benchmarks/results/quality.md)")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "auto"],
                        help="generation backend (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and every draw")
    parser.set_defaults(func=run)


def subject_photos(folder: Path, size: int, seed: int = 0, count: int = 5) -> list[Path]:
    """The subject: the same held-out leaf (SUBJECT), photographed on different backgrounds."""
    from blockskip.models.crops import ATTRIBUTES, render

    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = ATTRIBUTES["background"]
    paths = []
    for i in range(count):
        paths.append(folder / f"leaf{i}.png")
        render({**SUBJECT, "background": backgrounds[i % len(backgrounds)]}, seed=seed * 100 + i,
               size=size).save(paths[-1])
    return paths


def seen_attributes(classifier, paths: list) -> list[dict[str, str]]:
    """What the attribute classifier sees in each image (its 32 px input size), for SUBJECT's attributes."""
    import torch

    from blockskip.models.crops import ATTRIBUTES, to_tensor

    images = to_tensor([Image.open(p).convert("RGB") for p in paths])
    if images.shape[-1] != 32 or images.shape[-2] != 32:
        images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    predicted = classifier.predict(images)
    return [{attr: ATTRIBUTES[attr][int(predicted[attr][i])] for attr in SUBJECT} for i in range(len(paths))]


def subject_scores(classifier, paths: list) -> dict[str, float]:
    """How often the attribute classifier sees the subject's shape, colour and pattern."""
    seen = seen_attributes(classifier, paths)
    return {attr: sum(s[attr] == SUBJECT[attr] for s in seen) / len(seen) for attr in SUBJECT}


# ---- checks before any work ------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> None:
    """Values that need no model; raises ConfigError naming the option."""
    for option, value, low in (("--steps", args.steps, 1), ("--samples", args.samples, 1), ("--size", args.size, 1),
                               ("--train-size", args.train_size, 1), ("--max-last", args.max_last, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{option} must be >= {low}, got {value}")
    if args.train_size is not None and args.train_size > args.size:
        raise ConfigError(f"--train-size ({args.train_size}) must be <= --size ({args.size})")
    if not 0 <= args.skip_ratio < 1:
        raise ConfigError(f"--skip-ratio must be in [0, 1) (at least one block is kept), got {args.skip_ratio}")


def check_sizes(args: argparse.Namespace, model) -> None:
    """Sizes against the model's pixel granularity (pixels per token side)."""
    g = model.granularity
    for option, value in (("--size", args.size), ("--train-size", args.train_size)):
        if value is not None and value % g:
            raise ConfigError(f"{option} must be a multiple of {g} (pixels per token of this model), got {value}")


def unfinished_run(out: Path) -> list[Path]:
    """What to clear before the run: nothing for a new or empty folder, the entries of an earlier
    demo run that did not finish; raises InputError for a finished report or somebody else's files."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return []
    if (out / "report.html").exists():
        raise InputError(f"{out} holds a finished demo report; pass another --out or remove it")
    foreign = [p.name for p in entries if p.name not in DEMO_ENTRIES]
    if not (out / MARKER).is_file() or foreign:
        raise InputError(f"{out} is not empty ({', '.join(foreign[:3]) or 'files of another program'}); "
                         "pass another --out or remove it")
    return entries


# ---- progress --------------------------------------------------------------------------------
def _step(name: str, number: int, total: int = 8) -> float:
    print(f"[{number}/{total}] {name}", flush=True)
    return time.perf_counter()


def _say(text: str) -> None:
    print(f"      {text}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TrainProgress:
    """Plain progress lines, on a terminal and in a log alike: every tenth of the run, at least
    every `every_s` seconds, and at the end; the loss is the mean of the last tenth of the steps."""

    def __init__(self, every_s: float = 30.0):
        self.every_s, self.events, self.losses, self.last = every_s, [], [], time.perf_counter()

    def __call__(self, event: dict) -> None:
        from blockskip.demo_report import smoothing_window

        self.events.append(event)
        if event["type"] != "progress":
            return
        step, total = event["step"], event["total"]
        self.losses.append(event["loss"])
        now = time.perf_counter()
        if step % max(1, total // 10) and step != total and now - self.last < self.every_s:
            return
        self.last = now
        window = self.losses[-smoothing_window(total):]
        eta = f"ETA {_duration(event['eta_s'])}" if step < total and event.get("eta_s") is not None else "done"
        _say(f"step {step:>{len(str(total))}}/{total}  loss {sum(window) / len(window):.4f} "
             f"(mean of last {len(window)})  {event['steps_per_s']:.1f} steps/s  {eta}")


def _generate_progress(label: str, images: int, steps: int, every_s: float = 10.0):
    """Progress of one generate() call: when the backend is ready (an ONNX export takes a while),
    then the images done, at most every `every_s` seconds."""
    state = {"start": time.perf_counter(), "last": 0.0}

    def on_event(event: dict) -> None:
        now = time.perf_counter()
        if event["step"] == 1:
            _say(f"{label}: backend ready after {_duration(now - state['start'])}")
            state["last"] = now
        done = event["step"] // steps
        if event["step"] % steps == 0 and (done == images or now - state["last"] >= every_s):
            state["last"] = now
            _say(f"{label}: {done}/{images} images" + (f", ETA {_duration(event['eta_s'])}" if done < images else ""))

    return on_event


# ---- the demo --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    check_args(args)
    leftovers = unfinished_run(out)
    started = time.perf_counter()

    from blockskip.demo_report import html_page, loss_plot, loss_summary, size_text
    from blockskip.edge.dataset import METADATA, generate_dataset
    from blockskip.edge.dataset_spec import spec_from_data
    from blockskip.edge.generate import GenerateConfig, generate
    from blockskip.edge.train import TrainConfig, train
    from blockskip.host.bundle import TrustPolicy, generate_keypair, verify_bundle
    from blockskip.host.cache import list_images
    from blockskip.host.encoders import EfficientNetLite0
    from blockskip.host.plan import DEFAULT_FEATURE_DTYPE, make_plan, skip_budget
    from blockskip.host.prepare import PrepareSettings, prepare
    from blockskip.host.profile import masking_profile
    from blockskip.models.pipeline import load_model, save_model, tiny_model
    from blockskip.plan import LoraSettings, PatchSchedule

    if args.model == "builtin":
        from blockskip.models.crops import MODEL_DIR

        model = load_model(MODEL_DIR)
    else:
        model = tiny_model(args.model.removeprefix("tiny-"), seed=args.seed)
    check_sizes(args, model)
    k = skip_budget(model.family.num_blocks, args.skip_ratio)
    user_photos = list_images(args.images) if args.images else None
    if leftovers:
        print(f"clearing the unfinished demo run in {out}")
        for path in leftovers:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2))
    seconds = {}

    t = _step("model and subject photos", 1)
    if args.model == "builtin":
        model_dir = MODEL_DIR
    else:
        model_dir = save_model(model, out / "model")
        model = load_model(model_dir)
    subject = user_photos or subject_photos(out / "subject", args.size, args.seed)
    _say(f"{len(subject)} subject photos" + ("" if user_photos else f" in {out / 'subject'}"))
    seconds["model and subject photos"] = time.perf_counter() - started

    t = _step("profile: cross-attention masking sensitivity", 2)
    key = profile_key(model_dir, args.size) if args.model == "builtin" else None
    profile = cached_profile(key)
    if profile is None:
        profile = masking_profile(model, EfficientNetLite0(), **profile_settings(args.size))
        profile["model"] = model.describe()
        profile["key"] = key
    else:
        _say(f"cached for the built-in model ({PROFILE_FILE.name}: same weights, prompts, seed, steps)")
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    seconds["profile"] = time.perf_counter() - t

    t = _step("plan", 3)
    schedule = PatchSchedule(s_min=args.train_size or args.size, s_max=args.size, granularity=model.granularity)
    plan = make_plan(profile, model, k, schedule, LoraSettings.for_model(model)[0], args.samples,
                     text_len=model.text_encoder.max_length, precision="fp32", max_last=args.max_last,
                     feature_dtype=DEFAULT_FEATURE_DTYPE)
    plan.save(out / "plan.json")
    _say(f"skip first {plan.choice['n']} and last {plan.choice['m']}; keep {plan.kept}")
    seconds["plan"] = time.perf_counter() - t

    t = _step("prepare: the frozen full model over the photos (cache), then the base pack and the subject "
              "bundle, signed", 4)
    _say(f"{args.samples} training draws (crop, timestep, noise, prompt) through all "
         f"{model.family.num_blocks} blocks, stored in {plan.feature_dtype}")
    generate_keypair(out / "host.key", out / "host.pub")
    done = prepare(model, plan, subject, [PROMPT], out / "bundle", staging=out / "staging", bank_prompts=BANK,
                   base_pack_out=out / "base-pack",
                   settings=PrepareSettings(seed=args.seed, shard_size=16, signing_key=out / "host.key"))
    base_pack, bundle = done.base_pack, done.subject
    seconds["prepare"] = time.perf_counter() - t
    _say(f"done in {_duration(seconds['prepare'])}")

    t = _step("verify: both artifacts' checksums and signature, as the board checks them", 5)
    sizes = {}
    for name, folder in (("base pack", base_pack), ("subject bundle", bundle)):
        manifest = verify_bundle(folder, public_key=out / "host.pub", require_signature=True)
        sizes[name] = sum(entry["size"] for entry in manifest["files"].values())
    _say(f"base pack {size_text(sizes['base pack'])} (the kept weights: installed once per model and plan), "
         f"subject bundle {size_text(sizes['subject bundle'])} (features and prompt bank)")
    trust = TrustPolicy((out / "host.pub",))  # the board trusts the host's key, as deploy/ sets it up
    seconds["verify"] = time.perf_counter() - t

    t = _step("train: LoRA on the kept blocks only (edge)", 6)
    progress = TrainProgress()
    result = train(bundle, out / "adapter", TrainConfig(steps=args.steps, grad_accum=2, lr=1e-3,
                                                        checkpoint_every=50, seed=args.seed, track_memory=True),
                   on_event=progress, trust=trust, base_pack=base_pack)
    losses = json.loads((out / "adapter" / "losses.json").read_text())
    loss = loss_summary(losses)
    start_event = next(e for e in progress.events if e["type"] == "start")
    peak = max(e["peak_mem_bytes"] for e in progress.events if e["type"] == "progress")
    _say(f"loss {loss['first']:.4f} -> {loss['last']:.4f} (mean of the first and of the last {loss['window']} "
         f"steps); adapter {result['adapter']}")
    seconds["train"] = time.perf_counter() - t

    t = _step(f"generate before/after through {args.backend}", 7)
    images = len(BANK) * SAMPLE_COUNT
    common = dict(model=str(model_dir), prompts=BANK, bundle=str(bundle), seed=args.seed, steps=SAMPLE_STEPS,
                  count=SAMPLE_COUNT, height=args.size, width=args.size, backend=args.backend,
                  cache_dir=str(out / "engines"))
    before = generate(GenerateConfig(out_dir=str(out / "before"), **common),
                      on_event=_generate_progress("base model", images, SAMPLE_STEPS), trust=trust)
    after = generate(GenerateConfig(out_dir=str(out / "after"), adapter=str(out / "adapter"), **common),
                     on_event=_generate_progress("with the adapter", images, SAMPLE_STEPS), trust=trust)
    backend = json.loads((out / "after" / "generate.json").read_text())["backends"][0].get("backend", args.backend)
    seconds["generate"] = time.perf_counter() - t

    t = _step("dataset: a small image-folder dataset of the subject (generate --dataset)", 8)
    spec = spec_from_data({"seed": args.seed, "images_per_combination": SAMPLE_COUNT,
                           "classes": [{"name": "subject", "prompts": BANK}]})
    on_image = _generate_progress("dataset", images, SAMPLE_STEPS)
    made = generate_dataset(spec, GenerateConfig(**{**common, "prompts": spec.prompts(), "count": 1},
                                                 out_dir=str(out / "dataset"), adapter=str(out / "adapter")),
                            on_event=lambda e: e["type"] == "progress" and on_image(e), trust=trust)
    rows = [json.loads(line) for line in (out / "dataset" / METADATA).read_text().splitlines()]
    _say(f"{sum(made['classes'].values())} images in {out / 'dataset'} (one folder per class, metadata.jsonl, a "
         f"caption .txt per image): datasets.load_dataset(\"imagefolder\", data_dir=\"{out / 'dataset'}\")")
    seconds["dataset"] = time.perf_counter() - t

    samples = [{"prompt": b["prompt"], "seed": b["seed"], "before": b["path"], "after": a["path"]}
               for b, a in zip(before, after)]
    scores = None
    if args.model == "builtin" and not user_photos:
        from blockskip.models.crops import ATTRIBUTES, load_classifier

        classifier = load_classifier()
        for name in ("before", "after"):
            for sample, seen in zip(samples, seen_attributes(classifier, [s[name] for s in samples])):
                sample[f"{name}_seen"] = seen
        photos = subject_scores(classifier, subject)
        scores = {attr: {"subject": SUBJECT[attr], "classes": len(ATTRIBUTES[attr]),
                         "chance": 1 / len(ATTRIBUTES[attr]), "photos": photos[attr],
                         "before": sum(s["before_seen"][attr] == SUBJECT[attr] for s in samples) / len(samples),
                         "after": sum(s["after_seen"][attr] == SUBJECT[attr] for s in samples) / len(samples)}
                  for attr in SUBJECT}
        _say("subject attributes seen by the classifier, base model -> after training (chance): " + ", ".join(
            f"{a} {s['before']:.0%} -> {s['after']:.0%} ({s['chance']:.0%})" for a, s in scores.items()))
    full_bytes = sum(p.numel() * p.element_size() for p in model.family.model.parameters())
    report = {
        "family": model.family.name, "model": args.model, "steps": args.steps, "samples_cached": args.samples,
        "attribute_scores": scores,
        "subject_attributes_before": {a: s["before"] for a, s in scores.items()} if scores else None,
        "subject_attributes_after": {a: s["after"] for a, s in scores.items()} if scores else None,
        "plan": plan.to_dict()["plan"], "bundle_verified": True, "backend": backend, "bundle_bytes": sizes,
        "loss": loss, "losses": losses, "seconds": seconds, "samples": samples,
        "memory_table": {
            "full transformer weights": f"{full_bytes / 1024:.0f} KiB",
            "weights held by the edge trainer": f"{start_event['model_bytes'] / 1024:.0f} KiB "
                                                 f"({start_event['model_bytes'] / full_bytes:.0%})",
            "planned edge training memory (estimate)": f"{plan.estimates['train_memory_bytes'] / 2**20:.1f} MiB",
            "peak tensor memory while training (weights, LoRA, gradients, AdamW, activations)":
                f"{result['peak_tensor_bytes'] / 2**20:.1f} MiB",
            "peak process memory while training (RSS: interpreter and libraries included)": f"{peak / 2**20:.0f} MiB",
        },
        "images_before": [r["path"] for r in before], "images_after": [r["path"] for r in after],
        "dataset": {"folder": str(out / "dataset"), "rows": rows},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    page = html_page(out, report, [Path(p) for p in subject], loss_plot(losses, out / "loss.png"), SUBJECT)
    print(f"report: {page}  ({_duration(time.perf_counter() - started)} in all)")
    return 0

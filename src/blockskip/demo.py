"""`blockskip demo`: the whole pipeline end to end on the built-in model; no downloads, no GPU.

The built-in model is a small FLUX-family text-to-image model pretrained on procedural crop-leaf
images (models/crops.py, models/CROPS.md). The subject is a leaf it never saw in pretraining (a
red heart-shaped leaf with stripes). Steps, each with progress: subject photos (or your --images
folder), profile (cross-attention masking sensitivity; committed for the built-in model,
models/weights/crop-profile.json, and used while the weights and settings match), plan (50% skip),
cache (frozen full model, one pass per draw), bundle (signed) and verify, train LoRA on the kept
blocks only (the edge path), then generate before/after images through ONNX Runtime. Writes a
report folder: report.html (one page embedding everything), samples_before.png /
samples_after.png, loss.png, memory table, and report.json.

`--model tiny-flux` / `tiny-sana` run the same steps on random tiny models instead (their
images are noise; they show the mechanics only).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from blockskip.errors import InputError

PROMPT = "a photo of sks leaf"
BANK = ["a photo of sks leaf", "a photo of sks leaf on soil", "a photo of sks leaf on sky"]
SUBJECT = {"shape": "heart", "colour": "red", "pattern": "stripes"}  # held out of pretraining


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the end-to-end demo on the built-in crop-leaf model (CPU, offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="blockskip-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--images", help="folder of subject photos (default: generate a procedural leaf set)")
    parser.add_argument("--model", default="builtin", choices=["builtin", "tiny-flux", "tiny-sana"],
                        help="builtin: the pretrained crop-leaf model; tiny-*: random tiny models")
    parser.add_argument("--skip-ratio", type=float, default=0.5, help="fraction of blocks to skip (default: 0.5)")
    parser.add_argument("--max-last", type=int,
                        help="skip at most this many blocks at the end (see `blockskip plan --help`; "
                             "default: the profile's argmin)")
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


def profile_settings(size: int) -> dict:
    """The demo's profile measurement (masking_profile arguments besides the model and encoder)."""
    return {"prompts": BANK[:2], "seeds": [0], "steps": 4, "size": size}


def profile_key(model_dir: Path, size: int) -> dict:
    """What the demo's profile depends on: the weights' bytes, the encoder and the settings."""
    import hashlib

    weights = Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors"
    return {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), **profile_settings(size),
            "encoder": "efficientnet-lite0"}


def _profile_cache() -> Path:
    from blockskip.models.crops import WEIGHTS

    return WEIGHTS / "crop-profile.json"


def cached_profile(key: dict | None) -> dict | None:
    """The committed profile of the built-in model when it was measured with exactly `key`."""
    path = _profile_cache()
    if key is None or not path.is_file():
        return None
    profile = json.loads(path.read_text())
    return profile if profile.get("key") == key else None


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


def subject_scores(classifier, paths: list[str]) -> dict[str, float]:
    """How often the attribute classifier sees the subject's shape, colour and pattern."""
    from blockskip.models.crops import ATTRIBUTES, to_tensor

    images = [Image.open(p).convert("RGB") for p in paths]
    predicted = classifier.predict(to_tensor(images))
    return {attr: float((predicted[attr] == ATTRIBUTES[attr].index(SUBJECT[attr])).float().mean())
            for attr in SUBJECT}


def _step(name: str, number: int, total: int = 7) -> float:
    print(f"[{number}/{total}] {name}", flush=True)
    return time.perf_counter()


def _grid(paths: list[str], out: Path, scale: int = 4) -> Path:
    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    sheet = Image.new("RGB", (w * scale * len(images), h * scale), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, 0))
    sheet.save(out)
    return out


def _loss_plot(losses: list[float], out: Path, width: int = 480, height: int = 200) -> Path:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    points = [(20 + i * (width - 40) / max(1, len(losses) - 1), height - 20 - (v - lo) / span * (height - 40))
              for i, v in enumerate(losses)]
    draw.line([(20, 20), (20, height - 20), (width - 20, height - 20)], fill="black")
    draw.line(points, fill=(30, 90, 200), width=2)
    draw.text((24, 4), f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} steps)", fill="black")
    image.save(out)
    return out


def _html(out: Path, report: dict, images: dict[str, Path]) -> Path:
    def embed(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in report["memory_table"].items())
    steps = "".join(f"<tr><td>{k}</td><td>{v:.1f}</td></tr>" for k, v in report["seconds"].items())
    if report["subject_attributes_after"]:
        note = "Subject attributes recognised by the attribute classifier, before -> after: " + ", ".join(
            f"{k} {report['subject_attributes_before'][k]:.0%} -> {report['subject_attributes_after'][k]:.0%}"
            for k in SUBJECT)
    else:
        note = "A random tiny model: its images show no leaf; this run shows the pipeline's mechanics."
    figures = "".join(f"<h2>{title}</h2><img src='{embed(path)}' style='image-rendering:pixelated'>"
                      for title, path in images.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>blockskip demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:2px 12px}}</style></head>
<body><h1>blockskip demo: DiT-BlockSkip on the {report['model']} {report['family']} model</h1>
<p>Skip plan: first {report['plan']['n']} and last {report['plan']['m']} of {report['plan']['num_blocks']} blocks;
kept {report['plan']['kept']}. Bundle verified: {report['bundle_verified']}. Generation backend: {report['backend']}.</p>
<p>{note}</p>
<h2>Memory</h2><table>{rows}</table><h2>Seconds per step</h2><table>{steps}</table>{figures}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def run(args: argparse.Namespace) -> int:
    from blockskip.edge.generate import GenerateConfig, generate
    from blockskip.edge.train import TrainConfig, train
    from blockskip.host.bundle import build_bundle, generate_keypair, verify_bundle
    from blockskip.host.cache import build_cache, list_images
    from blockskip.host.encoders import EfficientNetLite0
    from blockskip.host.patches import PatchSchedule
    from blockskip.host.plan import LoraSettings, make_plan, skip_budget
    from blockskip.host.profile import masking_profile
    from blockskip.models.pipeline import load_model, save_model, tiny_model

    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; pass another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t = _step("model and subject photos", 1)
    if args.model == "builtin":
        from blockskip.models.crops import MODEL_DIR

        model_dir = MODEL_DIR
    else:
        model_dir = save_model(tiny_model(args.model.removeprefix("tiny-"), seed=args.seed), out / "model")
    model = load_model(model_dir)
    subject = list_images(args.images) if args.images else subject_photos(out / "subject", args.size, args.seed)
    seconds["model and subject"] = time.perf_counter() - t

    t = _step("profile: cross-attention masking sensitivity", 2)
    key = profile_key(model_dir, args.size) if args.model == "builtin" else None
    profile = cached_profile(key)
    if profile is None:
        profile = masking_profile(model, EfficientNetLite0(), **profile_settings(args.size))
        profile["model"] = model.describe()
        profile["key"] = key
    else:
        print(f"      cached for the built-in model ({_profile_cache().name}: same weights, prompts, seed, steps)")
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    seconds["profile"] = time.perf_counter() - t

    t = _step("plan", 3)
    schedule = PatchSchedule(s_min=args.train_size or args.size, s_max=args.size, granularity=model.granularity)
    k = skip_budget(model.family.num_blocks, args.skip_ratio)
    plan = make_plan(profile, model, k, schedule, LoraSettings(rank=8, alpha=8, scope="all"), args.samples,
                     text_len=model.text_encoder.max_length, precision="fp32", max_last=args.max_last)
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    print(f"      skip first {plan['plan']['n']} and last {plan['plan']['m']}; keep {plan['plan']['kept']}")
    seconds["plan"] = time.perf_counter() - t

    t = _step("cache: frozen full model, one pass per draw", 4)
    stage = build_cache(model, plan, subject, [PROMPT], out / "staging", bank_prompts=BANK, seed=args.seed,
                        shard_size=16)
    seconds["cache"] = time.perf_counter() - t

    t = _step("bundle: checksummed and signed, then verified", 5)
    generate_keypair(out / "host.key", out / "host.pub")
    bundle = build_bundle(stage, out / "bundle", json.loads((stage / "bundle.json").read_text()),
                          signing_key=out / "host.key")
    verify_bundle(bundle, public_key=out / "host.pub", require_signature=True)
    seconds["bundle"] = time.perf_counter() - t

    t = _step("train: LoRA on the kept blocks only (edge)", 6)
    events = []
    result = train(bundle, out / "adapter", TrainConfig(steps=args.steps, grad_accum=2, lr=1e-3,
                                                        checkpoint_every=50, seed=args.seed, track_memory=True),
                   on_event=events.append)
    losses = json.loads((out / "adapter" / "losses.json").read_text())
    start_event = next(e for e in events if e["type"] == "start")
    peak = max(e["peak_mem_bytes"] for e in events if e["type"] == "progress")
    print(f"      loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter {result['adapter']}")
    seconds["train"] = time.perf_counter() - t

    t = _step(f"generate before/after through {args.backend}", 7)
    common = dict(model=str(model_dir), prompts=BANK, bundle=str(bundle), seed=args.seed, steps=12, count=2,
                  height=args.size, width=args.size, backend=args.backend, cache_dir=str(out / "engines"))
    before = generate(GenerateConfig(out_dir=str(out / "before"), **common))
    after = generate(GenerateConfig(out_dir=str(out / "after"), adapter=str(out / "adapter"), **common))
    backend = json.loads((out / "after" / "generate.json").read_text())["backends"][0].get("backend", args.backend)
    seconds["generate"] = time.perf_counter() - t

    full_bytes = sum(p.numel() * p.element_size() for p in model.family.model.parameters())
    if args.model == "builtin" and not args.images:
        from blockskip.models.crops import load_classifier

        classifier = load_classifier()
        before_scores = subject_scores(classifier, [r["path"] for r in before])
        after_scores = subject_scores(classifier, [r["path"] for r in after])
        print("      subject attributes seen by the classifier, before -> after: " + ", ".join(
            f"{k} {before_scores[k]:.0%} -> {after_scores[k]:.0%}" for k in SUBJECT))
    else:
        before_scores = after_scores = None
    report = {
        "family": model.family.name, "model": args.model,
        "subject_attributes_before": before_scores, "subject_attributes_after": after_scores,
        "plan": plan["plan"], "bundle_verified": True, "backend": backend,
        "losses": losses, "seconds": seconds,
        "memory_table": {
            "full transformer weights": f"{full_bytes / 1024:.0f} KiB",
            "weights held by the edge trainer": f"{start_event['model_bytes'] / 1024:.0f} KiB "
                                                 f"({start_event['model_bytes'] / full_bytes:.0%})",
            "planned edge training memory (estimate)": f"{plan['estimates']['train_memory_bytes'] / 2**20:.1f} MiB",
            "peak tensor memory while training (weights, LoRA, gradients, AdamW, activations)":
                f"{result['peak_tensor_bytes'] / 2**20:.1f} MiB",
            "peak process memory while training (RSS: interpreter and libraries included)": f"{peak / 2**20:.0f} MiB",
        },
        "images_before": [r["path"] for r in before], "images_after": [r["path"] for r in after],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    figures = {"subject photos": _grid([str(p) for p in subject], out / "subject.png", scale=1),
               "samples before (base model)": _grid(report["images_before"], out / "samples_before.png"),
               "samples after (with the adapter)": _grid(report["images_after"], out / "samples_after.png"),
               "loss": _loss_plot(losses, out / "loss.png")}
    page = _html(out, report, figures)
    print(f"report: {page}")
    return 0

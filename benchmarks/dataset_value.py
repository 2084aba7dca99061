"""Does a generated dataset help a classifier? The crop world's version of the test agricultural
papers make by hand (a recognizer trained with and without the synthetic images).

A subject class (a leaf held out of the crop model's pretraining, benchmarks/quality.py SUBJECTS)
has a few real photos; three look-alike classes (the subject with one attribute changed, or two
where one change would be held out too) have more. A fresh small CNN (not the scoring classifier)
is trained to tell the four apart on:

  (a) the real photos only;
  (b) the real photos + a generated set of the subject class from the base model, prompted with
      the class's description ("a red heart leaf with stripes on soil"): what text alone gives;
  (c) the real photos + a generated set from the personalized model ("a photo of sks leaf on
      soil"), per method: LoRA on the full model, DiT-BlockSkip 30% and 50% (trained from the
      subject's real photos with quality.py's settings, `--prior-weight` as given).

The generated sets are made with `generate --dataset`'s code (edge/dataset.py), so what is
measured is what a user of that command gets. Each is tested on held-out real photos of all four
classes: accuracy over all, and recall of the subject class, mean and spread over adapter seeds x
classifier seeds.

    python benchmarks/dataset_value.py --out benchmarks/results          # dataset_value.md / .json
    python benchmarks/dataset_value.py --quick                           # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the subjects, methods and adapter training of the quality benchmark)

CONDITIONS = ["real photos only", "+ base model's set (class description)", "+ LoRA set", "+ DiT-BlockSkip 30% set",
              "+ DiT-BlockSkip 50% set"]
METHOD_OF = {"+ LoRA set": "LoRA (full model, 32 px)", "+ DiT-BlockSkip 30% set": "DiT-BlockSkip 30%",
             "+ DiT-BlockSkip 50% set": "DiT-BlockSkip 50%"}


def look_alikes(subject: dict, count: int = 3) -> list[dict]:
    """Classes that differ from `subject` in one attribute (two where one change is held out
    too), none of them held out of pretraining."""
    import itertools

    from blockskip.models.crops import ATTRIBUTES, is_held_out

    found = []
    for changed in (1, 2):
        for attrs in itertools.combinations(("shape", "colour", "pattern"), changed):
            for values in itertools.product(*(ATTRIBUTES[a] for a in attrs)):
                other = {**subject, **dict(zip(attrs, values))}
                if any(other[a] == subject[a] for a in attrs) or is_held_out({**other, "background": "soil"}):
                    continue
                if other not in found:
                    found.append(other)
                    break  # one per attribute set
            if len(found) == count:
                return found
    return found


def render_set(classes: list[dict], per_class: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from blockskip.models.crops import ATTRIBUTES, render, to_tensor

    images, labels = [], []
    backgrounds = ATTRIBUTES["background"]
    for label, (attrs, n) in enumerate(zip(classes, per_class)):
        for i in range(n):
            images.append(render({**attrs, "background": backgrounds[i % len(backgrounds)]},
                                 seed=seed + 1000 * label + i, size=32))
            labels.append(label)
    return to_tensor(images), torch.tensor(labels)


def generated_set(model_dir: Path, adapter: Path | None, prompt: str, count: int, out: Path, args) -> torch.Tensor:
    """`count` images of `prompt` ({background} over the four) through generate --dataset's code."""
    from blockskip.edge.dataset import generate_dataset
    from blockskip.edge.dataset_spec import spec_from_data
    from blockskip.edge.generate import GenerateConfig
    from blockskip.models.crops import ATTRIBUTES, to_tensor

    backgrounds = list(ATTRIBUTES["background"])
    spec = spec_from_data({"seed": 50_000, "images_per_combination": -(-count // len(backgrounds)),
                           "variables": {"background": backgrounds},
                           "classes": [{"name": "subject", "prompt": prompt}]})
    config = GenerateConfig(model=str(model_dir), prompts=spec.prompts(), out_dir=str(out),
                            adapter=str(adapter) if adapter else None, steps=args.sample_steps, height=32, width=32,
                            backend="torch")
    generate_dataset(spec, config)
    files = sorted((out / "subject").glob("*.png"))[:count]
    return to_tensor([Image.open(p).convert("RGB") for p in files])


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(64, classes))

    def forward(self, x):
        return self.net(x)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int, seed: int, steps: int) -> SmallCNN:
    """A fresh CNN, Adam, class-balanced batches (each class drawn equally often), flips as the
    only augmentation."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(classes)]
    for _ in range(steps):
        picks = torch.cat([idx[torch.randint(len(idx), (8,), generator=gen)] for idx in by_class])
        x = images[picks]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = torch.nn.functional.cross_entropy(model(x), labels[picks])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def score(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = model(images).argmax(1)
    subject = labels == 0
    return {"accuracy": float((predicted == labels).float().mean()),
            "subject_recall": float((predicted[subject] == 0).float().mean())}


def main() -> int:
    from blockskip.host.encoders import EfficientNetLite0
    from blockskip.host.patches import PatchSchedule
    from blockskip.host.profile import masking_profile
    from blockskip.models.crops import WEIGHTS, caption, load_crop_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for dataset_value.md / .json")
    parser.add_argument("--subjects", type=int, nargs="+", default=[0, 2],
                        help="quality.SUBJECTS indices (default: 0 2)")
    parser.add_argument("--seeds", type=int, default=2, help="adapter training seeds (default: 2)")
    parser.add_argument("--clf-seeds", type=int, default=3, help="classifier seeds per set (default: 3)")
    parser.add_argument("--real", type=int, default=5, help="real photos of the subject class (default: 5)")
    parser.add_argument("--real-others", type=int, default=30, help="real photos per look-alike class (default: 30)")
    parser.add_argument("--generated", type=int, default=40, help="generated images of the subject (default: 40)")
    parser.add_argument("--test", type=int, default=40, help="held-out real photos per class (default: 40)")
    parser.add_argument("--clf-steps", type=int, default=400, help="classifier training steps (default: 400)")
    parser.add_argument("--prior-weight", type=float, default=0.0,
                        help="prior preservation weight of the adapters (default: 0)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=12)
    parser.add_argument("--prior-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 subject, 1 seed, few steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.seeds, args.clf_seeds, args.steps, args.generated, args.clf_steps = [0], 1, 1, 10, 8, 50
        args.sample_steps, args.test = 4, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = load_crop_model()
    model_dir = WEIGHTS / "crop-flux"
    encoder = EfficientNetLite0()
    profile = masking_profile(base, encoder, [caption(s) for s in quality.SUBJECTS[:2]] + ["a green oval leaf on soil"],
                              [0], steps=8, size=32, progress=False)
    scores: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.subjects:
            subject = quality.SUBJECTS[s]
            classes = [subject] + look_alikes(subject)
            print(f"subject {s}: {caption(subject)}; look-alikes: {'; '.join(caption(c) for c in classes[1:])}",
                  flush=True)
            real, real_labels = render_set(classes, [args.real] + [args.real_others] * (len(classes) - 1), 100 * s)
            test, test_labels = render_set(classes, [args.test] * len(classes), 7_000_000 + 100 * s)
            photos = []
            for i in range(args.real):  # the subject's real photos are the adapters' training photos
                photos.append(Path(tmp) / f"s{s}-photo{i}.png")
                Image.fromarray(((real[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(photos[-1])
            sets = {"real photos only": [None]}
            description = caption(subject) + " on {background}"
            sets["+ base model's set (class description)"] = [
                generated_set(model_dir, None, description, args.generated, Path(tmp) / f"s{s}-base", args)]
            for condition, method in METHOD_OF.items():
                kind, ratio, (s_min, s_max, schedule_name), use_residuals = quality.METHODS[method]
                plan = quality.skip_plan(kind, ratio, base.family.num_blocks, profile)
                schedule = PatchSchedule(s_min=s_min, s_max=s_max, granularity=base.granularity,
                                         schedule=schedule_name)
                sets[condition] = []
                for seed in range(args.seeds):
                    work = Path(tmp) / f"s{s}-{abs(hash(method))}-{seed}"
                    trained = quality.train_adapter(base, plan, schedule, photos, work, seed, args, use_residuals,
                                                    prior_weight=args.prior_weight, track_memory=False)
                    sets[condition].append(generated_set(model_dir, trained["adapter"], quality.IDENTIFIER +
                                                         " on {background}", args.generated, work / "set", args))
            for condition, generated in sets.items():
                for g, extra in enumerate(generated):
                    images = real if extra is None else torch.cat([real, extra])
                    labels = real_labels if extra is None else torch.cat(
                        [real_labels, torch.zeros(len(extra), dtype=torch.long)])
                    for clf_seed in range(args.clf_seeds):
                        classifier = train_classifier(images, labels, len(classes), clf_seed, args.clf_steps)
                        result = {**score(classifier, test, test_labels), "subject": s, "set": g, "clf_seed": clf_seed}
                        scores[condition].append(result)
                    last = scores[condition][-args.clf_seeds:]
                    print(f"  {condition:42s} set {g}: accuracy "
                          f"{statistics.mean(r['accuracy'] for r in last):.3f}, subject recall "
                          f"{statistics.mean(r['subject_recall'] for r in last):.3f}  "
                          f"[{time.perf_counter() - started:.0f}s]", flush=True)
    lines = [f"Crop world, subjects {', '.join(caption(quality.SUBJECTS[s]) for s in args.subjects)}, each among "
             f"three look-alike classes. Real training photos: {args.real} of the subject, {args.real_others} per "
             f"look-alike; generated: {args.generated} images of the subject ({args.sample_steps} steps, torch, "
             f"through `generate --dataset`'s code); test: {args.test} held-out real photos per class. A fresh CNN, "
             f"{args.clf_steps} steps, class-balanced batches; mean ± spread over {args.seeds} adapter seed(s) x "
             f"{args.clf_seeds} classifier seed(s) x subjects. Adapters: quality.py's settings ({args.steps} steps x "
             f"{args.grad_accum}, lr {args.lr}, rank {args.rank}), prior weight {args.prior_weight:g}.", "",
             "| training set | accuracy | subject recall | accuracy vs real only |", "|---|---|---|---|"]
    reference = statistics.mean(r["accuracy"] for r in scores["real photos only"])
    for condition, rows in scores.items():
        accuracy = quality.summarize(rows, "accuracy")
        lines.append(f"| {condition} | {accuracy} | {quality.summarize(rows, 'subject_recall')} | "
                     f"{statistics.mean(r['accuracy'] for r in rows) - reference:+.3f} |")
    text = "\n".join(lines)
    (out / "dataset_value.md").write_text(text + "\n")
    (out / "dataset_value.json").write_text(json.dumps({"args": vars(args), "scores": scores}, indent=2))
    print(text)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

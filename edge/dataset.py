"""`blockskip generate --dataset SPEC`: a generated image-folder dataset, offline, on any backend.

SPEC (YAML) says what to render; the command line says how (model, adapter, size, steps, backend):

    seed: 0                        # image i of the dataset (in the order below) uses seed + i
    images_per_combination: 2      # default for every class
    variables:                     # {name} in a prompt takes each value in turn
      background: [soil, sky, canopy, straw]
      lighting: [morning light, overcast]
    classes:
      - name: sks_leaf             # the class folder: [A-Za-z0-9_.-], 1-64 characters
        prompt: "a photo of sks leaf on {background}, {lighting}"   # or prompts: [...]
        adapter: adapters/leaf     # optional: this class's adapter (default: --adapter, or none)
        images_per_combination: 4  # optional
      - name: other_leaf
        prompt: "a photo of a green leaf on {background}"

A class renders every combination of the variables its prompts name (a prompt naming none is one
combination), `images_per_combination` times each. Written to OUT:

    OUT/<class>/<class>-<nnnnn>.png   the image (PNG text: prompt, seed, adapter hash, ...)
    OUT/<class>/<class>-<nnnnn>.txt   its caption (the prompt), for the trainers that read one
    OUT/metadata.jsonl               one line per image: file_name, label, prompt, seed, model,
                                     adapter_sha256, plan, backend, steps, height, width, variables
    OUT/dataset.json                 the spec, the render settings and the counts

`datasets.load_dataset("imagefolder", data_dir=OUT)` loads it as is (a `label` column holds the
class). A run that is stopped or killed resumes with the same command: images already written are
kept (their metadata line is what marks them done), none is made twice; another spec or other render
settings in the same OUT are refused. A SPEC error names its line and field.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from blockskip.bundle import TrustPolicy
from blockskip.edge.dataset_spec import DatasetSpec, load_spec
from blockskip.edge.generate import GenerateConfig, Sampler, StepProgress, _Stopped, save_png
from blockskip.edge.lora import CONFIG_FILE, adapter_file
from blockskip.errors import ConfigError, InputError
from blockskip.files import sha256_file

logger = logging.getLogger(__name__)
METADATA = "metadata.jsonl"
MANIFEST = "dataset.json"


# ---- rendering ---------------------------------------------------------------------------------
def _read_done(out: Path) -> dict[str, dict]:
    """file_name -> metadata row of the images already written (a torn last line is dropped)."""
    done = {}
    path = out / METADATA
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short: its image is made again
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and (out / row["file_name"]).is_file():
            done[row["file_name"]] = row
    return done


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def adapter_sha256(adapter: str | None) -> str | None:
    """The adapter file's full sha256 (the PNG text keeps generate's short form)."""
    return sha256_file(adapter_file(adapter)) if adapter else None


def adapter_plan(adapter: str | None) -> dict | None:
    """What the adapter was trained on, from the trainer's record beside it: the kept blocks and
    the bundle's content hash (None for the base model or a bare .safetensors)."""
    if not adapter:
        return None
    about = Path(adapter) / CONFIG_FILE if Path(adapter).is_dir() else Path(adapter).with_name(CONFIG_FILE)
    try:
        record = json.loads(about.read_text())
    except (OSError, ValueError):
        return None
    return {k: record[k] for k in ("kept_blocks", "bundle", "steps") if k in record} or None


def generate_dataset(spec: DatasetSpec, config: GenerateConfig, on_event: Callable[[dict], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, trust: TrustPolicy | None = None) -> dict:
    """Render `spec` into `config.out_dir` with `config`'s model, size, steps, backend (its
    `adapter` for classes that name none; its prompts and count are not used). Resumes what is
    there. Returns {"out", "images", "made", "kept", "stopped", "classes", "seconds", "backends"}."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = spec.items()
    settings = {"spec": asdict(spec), "model": config.model, "adapter": config.adapter, "bundle": config.bundle,
                "steps": config.steps, "height": config.height, "width": config.width, "backend": config.backend,
                "precision": config.precision, "guidance_scale": config.guidance_scale}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous.get("settings") != settings:
            raise InputError(f"{out} holds a dataset made with another spec or other settings; use a new --out "
                             f"(or the same spec and options to resume it)")
    elif any(out.iterdir()):
        raise InputError(f"{out} is not empty and holds no {MANIFEST}: give a new or empty folder for the dataset")
    manifest_path.write_text(json.dumps({"settings": settings, "images": len(items),
                                         "classes": [c.name for c in spec.classes]}, indent=2))
    done = _read_done(out)
    todo = [item for item in items if item["file_name"] not in done]
    _rewrite_metadata(out, items, done)  # drops torn lines and rows whose image is gone
    logger.info("dataset %s: %d images, %d already there, %d to make", out, len(items), len(done), len(todo))
    progress = StepProgress(len(todo) * config.steps, on_event, should_stop)
    if on_event:
        on_event({"type": "start", "images": len(items), "done": len(done), "todo": len(todo)})
    made, stopped, samplers, started = 0, False, {}, time.perf_counter()
    try:
        for item in todo:
            adapter = item["adapter"] if item["adapter"] is not None else config.adapter
            if adapter not in samplers:
                prompts = sorted({i["prompt"] for i in todo
                                  if (i["adapter"] if i["adapter"] is not None else config.adapter) == adapter})
                samplers[adapter] = Sampler(replace(config, prompts=prompts, prompt_indices=[], adapter=adapter),
                                            trust)
            sampler = samplers[adapter]
            image, backend = sampler.image(item["prompt"], item["seed"], progress)
            path = out / item["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            row = {"file_name": item["file_name"], "label": item["label"], "prompt": item["prompt"],
                   "seed": item["seed"], "variables": item["variables"], "model": config.model,
                   "adapter_sha256": adapter_sha256(adapter), "plan": adapter_plan(adapter), "backend": backend,
                   "steps": config.steps,
                   "height": config.height, "width": config.width}
            save_png(image, path, {k: row[k] for k in ("prompt", "seed", "label", "adapter_sha256", "backend")})
            caption = path.with_suffix(".txt")
            caption.with_name(caption.name + ".tmp").write_text(item["prompt"] + "\n")
            caption.with_name(caption.name + ".tmp").replace(caption)
            _append(out / METADATA, row)  # the line marks the image done
            made += 1
            if on_event:
                on_event({"type": "image", "file_name": item["file_name"], "label": item["label"],
                          "made": made, "todo": len(todo)})
    except _Stopped:
        stopped = True
        logger.info("dataset stopped after %d new image(s); run the same command again to resume", made)
    final = _read_done(out)
    if not stopped:
        _rewrite_metadata(out, items, final)  # the spec's order
    counts = {}
    for row in final.values():
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    return {"out": str(out), "images": len(items), "made": made, "kept": len(done), "stopped": stopped,
            "classes": counts, "seconds": time.perf_counter() - started,
            "backends": [b for s in samplers.values() for b in s.describe()]}


def _rewrite_metadata(out: Path, items: list[dict], done: dict[str, dict]) -> None:
    rows = [done[i["file_name"]] for i in items if i["file_name"] in done]
    tmp = out / (METADATA + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / METADATA)


# ---- command line: `generate --dataset` (this module registers `generate`) ------------------------
def register(subparsers) -> argparse.ArgumentParser:
    from blockskip.edge import generate as plain

    parser = plain.register(subparsers)
    parser.description += "\n\nWith --dataset SPEC: " + __doc__.split("\n", 2)[2]
    parser.add_argument("--dataset", type=Path, metavar="SPEC",
                        help="render the dataset SPEC (YAML: classes, prompt templates, variables, images per "
                             "combination, seed) into --out as an image-folder dataset with metadata.jsonl and a "
                             "caption .txt per image; resumes a stopped run (see above)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from blockskip.bundle import trust_from_args
    from blockskip.edge import generate as plain

    if args.dataset is None:
        return plain.run(args)
    if args.prompt or args.bank_index or args.count != 1 or args.list_prompts:
        raise ConfigError("--dataset takes its prompts and counts from the spec: leave out --prompt, --bank-index, "
                          "--count and --list-prompts")
    spec = load_spec(args.dataset)
    config = GenerateConfig(model=args.model, prompts=spec.prompts(), out_dir=args.out, adapter=args.adapter,
                            bundle=args.bundle, steps=args.steps, height=args.height, width=args.width,
                            backend=args.backend, cache_dir=args.cache_dir, precision=args.precision,
                            board=args.board, memory_budget_gib=args.memory_budget)
    trust = trust_from_args(args) if args.bundle else None
    bar = _Bar()
    result = generate_dataset(spec, config, on_event=bar, trust=trust)
    bar.close()
    classes = ", ".join(f"{name} {count}" for name, count in result["classes"].items())
    print(f"dataset {result['out']}: {sum(result['classes'].values())} of {result['images']} images ({classes}); "
          f"{result['made']} made now, {result['kept']} kept from before, in {result['seconds']:.0f} s")
    print(f'load it with datasets.load_dataset("imagefolder", data_dir="{result["out"]}")')
    return 0


class _Bar:
    """A tqdm bar over the images, with the sampling steps' ETA."""

    def __init__(self):
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if event["type"] == "start":
            self.bar = tqdm(total=event["images"], initial=event["done"], unit="image", desc="dataset")
        elif event["type"] == "image" and self.bar is not None:
            self.bar.update(1)
        elif event["type"] == "progress" and self.bar is not None and event.get("eta_s") is not None:
            self.bar.set_postfix_str(f"eta {event['eta_s']:.0f}s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

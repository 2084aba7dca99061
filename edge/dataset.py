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
import itertools
import json
import logging
import os
import re
import string
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from blockskip.bundle import TrustPolicy
from blockskip.edge.generate import GenerateConfig, Sampler, StepProgress, _Stopped, save_png
from blockskip.edge.lora import CONFIG_FILE
from blockskip.errors import ConfigError, InputError

logger = logging.getLogger(__name__)
CLASS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
METADATA = "metadata.jsonl"
MANIFEST = "dataset.json"
MAX_IMAGES = 1_000_000


@dataclass
class ClassSpec:
    name: str
    prompts: list[str]  # templates with {variable} fields
    adapter: str | None = None
    images_per_combination: int = 1

    def combinations(self, variables: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
        """(prompt, the variables' values) for every prompt x combination of the variables it names."""
        out = []
        for template in self.prompts:
            names = sorted({f for _, f, _, _ in string.Formatter().parse(template) if f})
            for values in itertools.product(*(variables[n] for n in names)):
                chosen = dict(zip(names, values))
                out.append((template.format(**chosen), chosen))
        return out


@dataclass
class DatasetSpec:
    classes: list[ClassSpec]
    variables: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0

    def items(self) -> list[dict]:
        """Every image of the dataset, in order: {"index", "label", "prompt", "seed", "variables",
        "adapter", "file_name"}."""
        items = []
        for cls in self.classes:
            number = 0
            for prompt, chosen in cls.combinations(self.variables):
                for _ in range(cls.images_per_combination):
                    items.append({"index": len(items), "label": cls.name, "prompt": prompt,
                                  "seed": self.seed + len(items), "variables": chosen, "adapter": cls.adapter,
                                  "file_name": f"{cls.name}/{cls.name}-{number:05d}.png"})
                    number += 1
        return items

    def prompts(self) -> list[str]:
        return sorted({item["prompt"] for item in self.items()})


# ---- the SPEC, with line numbers in its errors -------------------------------------------------
class _Where:
    """Line numbers of a YAML document's fields: `line("classes", 1, "prompt")`."""

    def __init__(self, text: str):
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            self.root = None

    def line(self, *path) -> int | None:
        node = self.root
        for key in path:
            if isinstance(node, yaml.MappingNode):
                found = [(k, v) for k, v in node.value if k.value == key]
                if not found:
                    return node.start_mark.line + 1
                node = found[0][1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
            else:
                break
        return node.start_mark.line + 1 if node is not None else None


def _field_name(path: tuple) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and check a SPEC file; a mistake raises InputError naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset spec {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    where = _Where(text)

    def fail(message: str, *at) -> InputError:
        line = where.line(*at)
        return InputError(f"{path}: line {line}: {_field_name(at)}: {message}" if at else f"{path}: {message}")

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{path}: {line}not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a dataset spec is a mapping with `classes` (see `blockskip generate --help`)")
    known = {"seed", "images_per_combination", "variables", "classes"}
    for key in data:
        if key not in known:
            raise fail(f"unknown field (known: {', '.join(sorted(known))})", key)

    def integer(value, low, *at, high=MAX_IMAGES) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(f"must be an integer from {low} to {high}, got {value!r}", *at)
        return value

    seed = integer(data.get("seed", 0), 0, "seed", high=2**62)
    default_count = integer(data.get("images_per_combination", 1), 1, "images_per_combination")
    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        raise fail("must map variable names to lists of values", "variables")
    for name, values in variables.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise fail("a variable name is letters, digits and _ (not starting with a digit)", "variables", name)
        if not isinstance(values, list) or not values or not all(isinstance(v, (str, int, float)) and
                                                                 not isinstance(v, bool) for v in values):
            raise fail("must be a non-empty list of values", "variables", name)
        variables[name] = [str(v) for v in values]
    classes_data = data.get("classes")
    if not isinstance(classes_data, list) or not classes_data:
        raise fail("must be a non-empty list of classes (each with a name and a prompt)", "classes") \
            if "classes" in data else InputError(f"{path}: no `classes`: give at least one class with a name and "
                                                 f"a prompt")
    classes, names = [], set()
    for i, entry in enumerate(classes_data):
        if not isinstance(entry, dict):
            raise fail("a class is a mapping with name and prompt", "classes", i)
        for key in entry:
            if key not in {"name", "prompt", "prompts", "adapter", "images_per_combination"}:
                raise fail("unknown field (known: adapter, images_per_combination, name, prompt, prompts)",
                           "classes", i, key)
        name = entry.get("name")
        if not isinstance(name, str) or not CLASS_NAME.match(name):
            raise fail(f"must be 1-64 characters of [A-Za-z0-9_.-] (it names the class folder), got {name!r}",
                       "classes", i, "name")
        if name in names:
            raise fail(f"class {name!r} is listed twice", "classes", i, "name")
        names.add(name)
        if ("prompt" in entry) == ("prompts" in entry):
            raise fail("give exactly one of prompt (a string) or prompts (a list)", "classes", i)
        key = "prompt" if "prompt" in entry else "prompts"
        prompts = [entry[key]] if key == "prompt" else entry[key]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise fail("must be a non-empty string" if key == "prompt" else "must be a list of non-empty strings",
                       "classes", i, key)
        for p in prompts:
            try:
                fields = {f for _, f, spec, conv in string.Formatter().parse(p) if f is not None}
            except ValueError as err:
                raise fail(f"bad template {p!r}: {err} (write {{{{ and }}}} for literal braces)", "classes", i, key) \
                    from None
            for f in sorted(fields):
                if f not in variables:
                    raise fail(f"{{{f}}} is not a variable (variables: {', '.join(sorted(variables)) or 'none'})",
                               "classes", i, key)
        adapter = entry.get("adapter")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise fail("must be the path of an adapter folder or .safetensors", "classes", i, "adapter")
        count = integer(entry.get("images_per_combination", default_count), 1, "classes", i, "images_per_combination")
        classes.append(ClassSpec(name, prompts, adapter, count))
    spec = DatasetSpec(classes, variables, seed)
    total = sum(len(c.combinations(variables)) * c.images_per_combination for c in classes)
    if total > MAX_IMAGES:
        raise InputError(f"{path}: the spec makes {total} images; at most {MAX_IMAGES} per dataset")
    return spec


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
                   "adapter_sha256": sampler.adapter_id, "plan": adapter_plan(adapter), "backend": backend,
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
    if not stopped:
        _rewrite_metadata(out, items, _read_done(out))  # the spec's order
    counts = {}
    for row in _read_done(out).values():
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

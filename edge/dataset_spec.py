"""The dataset SPEC of `blockskip generate --dataset` and the agent's `dataset` action: reading and
checking it (every mistake named by line and field), and the images it asks for. No torch here, so
the agent checks a command's spec before it starts a job (edge/dataset.py renders it)."""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from blockskip.errors import InputError

CLASS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{path}: {line}not valid YAML ({getattr(err, 'problem', None) or err})") from None
    return spec_from_data(data, str(path), _Where(text))


def spec_from_data(data, source: str = "spec", where: _Where | None = None) -> DatasetSpec:
    """Check a parsed SPEC (a YAML file's, or the `spec` object of the agent's `dataset` command);
    a mistake raises InputError naming `source`, the line (when `where` knows it) and the field."""

    def fail(message: str, *at) -> InputError:
        line = where.line(*at) if where is not None and at else None
        place = f"line {line}: " if line is not None else ""
        return InputError(f"{source}: {place}{_field_name(at)}: {message}" if at else f"{source}: {message}")

    if not isinstance(data, dict):
        raise InputError(f"{source}: a dataset spec is a mapping with `classes` (see `blockskip generate --help`)")
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
    variables = dict(data.get("variables") or {})
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
            if "classes" in data else InputError(f"{source}: no `classes`: give at least one class with a name and "
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
        raise InputError(f"{source}: the spec makes {total} images; at most {MAX_IMAGES} per dataset")
    return spec

"""The feature-shard format shared by the host's `cache` (writer) and the edge's `train` (reader).

    features/prompts.safetensors     per-prompt conditioning: "{p}/{key}"
    features/shard-00000.safetensors draws [0, S): "{i}/entry/{key}", "{i}/residual/{a}-{b}/{key}",
                                     "{i}/cond/{key}", "{i}/target"; metadata "draws": JSON list of
                                     {"index", "prompt", "sigma", "image", "crop"}
    weights/kept_blocks.safetensors  kept blocks' and head's base weights, full-model key names

The reader memory-maps shards (safetensors `safe_open`) and loads one draw at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from blockskip.errors import BundleError

SHARD_PATTERN = "shard-{:05d}.safetensors"
PROMPTS_FILE = "prompts.safetensors"
WEIGHTS_FILE = "weights/kept_blocks.safetensors"


def draw_tensors(index: int, entry: dict, residuals: dict, cond: dict, target: torch.Tensor,
                 prompt_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Flatten one draw into shard keys (batch dimension removed; per-prompt keys left out)."""
    out = {f"{index}/entry/{k}": v[0] for k, v in entry.items()}
    for (start, end), state in residuals.items():
        out.update({f"{index}/residual/{start}-{end}/{k}": v[0] for k, v in state.items()})
    for key, value in cond.items():
        if key in prompt_keys:
            continue
        out[f"{index}/cond/{key}"] = value[0] if _batched(key, value) else value
    out[f"{index}/target"] = target[0]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _batched(key: str, value: torch.Tensor) -> bool:
    # ids and the token grid are shared across the batch; everything else has a batch dim.
    return key not in ("txt_ids", "img_ids", "grid")


def read_prompt_cond(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Per-prompt conditioning {prompt index: {key: tensor}} (empty when the file is absent)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    if not path.is_file():
        return out
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if key == "none":  # placeholder of a family without per-prompt conditioning
                continue
            prompt, name = key.split("/", 1)
            out.setdefault(int(prompt), {})[name] = handle.get_tensor(key)
    return out


class FeatureReader:
    """Random access to cached draws, one shard memory-mapped at a time."""

    def __init__(self, root: str | Path, prompt_keys: tuple[str, ...], dtype: torch.dtype = torch.float32):
        self.root = Path(root)
        self.prompt_keys = prompt_keys
        self.dtype = dtype
        self.shards = sorted((self.root / "features").glob("shard-*.safetensors"))
        if not self.shards:
            raise BundleError(f"{self.root}: no feature shards under features/")
        self.index: list[tuple[Path, dict]] = []
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as handle:
                draws = json.loads((handle.metadata() or {}).get("draws", "[]"))
            self.index.extend((shard, draw) for draw in draws)
        self.prompt_cond = read_prompt_cond(self.root / "features" / PROMPTS_FILE)
        self._open: tuple[Path, object] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, shard: Path):
        if self._open is None or self._open[0] != shard:
            self._open = (shard, safe_open(str(shard), framework="pt"))
        return self._open[1]

    def get(self, position: int):
        """(entry, residuals {(a, b): state}, cond, target, draw info), batch dim 1."""
        shard, draw = self.index[position]
        handle = self._handle(shard)
        prefix = f"{draw['index']}/"
        entry, residuals, cond = {}, {}, {}
        target = None
        for key in handle.keys():
            if not key.startswith(prefix):
                continue
            parts = key[len(prefix):].split("/")
            tensor = handle.get_tensor(key)
            tensor = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            if parts[0] == "entry":
                entry[parts[1]] = tensor[None]
            elif parts[0] == "residual":
                start, end = (int(x) for x in parts[1].split("-"))
                residuals.setdefault((start, end), {})[parts[2]] = tensor[None]
            elif parts[0] == "cond":
                cond[parts[1]] = tensor if not _batched(parts[1], tensor) else tensor[None]
            elif parts[0] == "target":
                target = tensor[None]
        for key, value in self.prompt_cond.get(draw["prompt"], {}).items():
            value = value.to(self.dtype) if value.is_floating_point() else value
            cond[key] = value if not _batched(key, value) else value[None]
        if target is None:
            raise BundleError(f"{shard.name}: draw {draw['index']} has no target")
        return entry, residuals, cond, target, draw

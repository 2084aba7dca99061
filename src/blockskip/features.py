"""The feature-shard format shared by the host's `cache` (writer) and the edge's `train` (reader).

    features/prompts.safetensors     per-prompt conditioning: "{p}/{key}"
    features/shard-00000.safetensors draws [0, S): "{i}/entry/{key}", "{i}/residual/{a}-{b}/{key}",
                                     "{i}/cond/{key}", "{i}/target"; with fp8 storage also
                                     "{i}/scale/entry/{key}", "{i}/scale/residual/{a}-{b}/{key}";
                                     metadata "draws": JSON list of
                                     {"index", "prompt", "sigma", "image", "crop"}
    weights/kept_blocks.safetensors  kept blocks' and head's base weights, full-model key names

Feature storage (`feature_dtype`): fp32 (exact), bf16, fp16, or fp8: the entry state and the span
residuals, the (tokens, channels) tensors that are nearly all of a draw's bytes, as float8 e4m3
with one fp32 scale per token (row), and everything else (target, conditioning) in bf16.

The reader memory-maps shards (safetensors `safe_open`), one at a time, loads one draw at a time
and converts it to the training dtype (dequantizing fp8 with its scales).
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

FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# fp8 scale granularity: one scale per token (row of a (tokens, channels) state). Per channel
# loses more on the features measured here (benchmarks/results/cache_size.md).
FP8_SCALE = "token"
QUANTIZED_PARTS = ("entry", "residual")  # the (tokens, channels) states that fp8 storage quantizes


def quantize_fp8(x: torch.Tensor, per: str = FP8_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with x ~ q.float() * scale: float8 e4m3 values and fp32 absmax scales, one per
    row (`per="token"`, scale (N, 1)) or per column (`per="channel"`, scale (1, D)) of a 2-D x."""
    assert x.ndim == 2, f"fp8 storage quantizes (tokens, channels) states, got shape {tuple(x.shape)}"
    if per not in ("token", "channel"):
        raise ValueError(f"fp8 scale granularity must be 'token' or 'channel', got {per!r}")
    x = x.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize non-finite features (the frozen model produced inf or NaN)")
    amax = x.abs().amax(dim=1 if per == "token" else 0, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row stays zero
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def storage_dtype(feature_dtype: str, part: str) -> torch.dtype:
    """What a draw's `part` ("entry", "residual", "cond", "target", "prompt") is stored as."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    if feature_dtype == "fp8" and part not in QUANTIZED_PARTS:
        return torch.bfloat16
    return FEATURE_DTYPES[feature_dtype]


def store_draw(tensors: dict[str, torch.Tensor], feature_dtype: str) -> dict[str, torch.Tensor]:
    """One draw's shard tensors (from `draw_tensors`) in the storage of `feature_dtype`; fp8 adds
    a "{i}/scale/..." tensor beside each quantized state. Integer tensors are kept as they are."""
    out = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        index, rest = key.split("/", 1)
        dtype = storage_dtype(feature_dtype, rest.split("/", 1)[0])
        if dtype == torch.float8_e4m3fn and value.ndim == 2:
            out[key], out[f"{index}/scale/{rest}"] = quantize_fp8(value)
        else:
            out[key] = value.to(torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype)
    return out


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
            if parts[0] == "scale":
                continue  # read with the tensor it scales
            tensor = handle.get_tensor(key)
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = dequantize_fp8(tensor, handle.get_tensor(f"{prefix}scale/{key[len(prefix):]}"), self.dtype)
            elif tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
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

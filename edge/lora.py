"""The LoRA adapter file: safetensors with the full model's diffusers/PEFT key names.

Keys are `transformer.<module path>.lora_A.weight` / `.lora_B.weight`, module paths exactly as in
the full diffusers transformer (e.g. `transformer.single_transformer_blocks.3.attn.to_q`). The
trained LoRA scale alpha / r is folded into `lora_B`, so the file holds the trained model at
scale 1 and says so: its config (safetensors metadata `lora_adapter_metadata`, keys prefixed
`transformer.`, the way diffusers' own `save_lora_weights` stores it) has `lora_alpha == r`.
A loader that reads that metadata and one that does not (diffusers infers alpha = r without
it) load the same model. Each of these gives the trained model, with no remapping:

    transformer.load_lora_adapter("adapter/pytorch_lora_weights.safetensors")   # the file
    transformer.load_lora_adapter("adapter", prefix="transformer", use_safetensors=True)
    transformer.load_lora_adapter("adapter", weight_name="pytorch_lora_weights.safetensors")
    pipeline.load_lora_weights("adapter")               # e.g. FluxPipeline; lora_state_dict too

The folder form of `load_lora_adapter` needs `use_safetensors=True` or `weight_name`: without
either, diffusers' model-level loader looks only for `pytorch_lora_weights.bin` (a pickle,
which this project does not write). `adapter_config.json` holds the same config plus the
trained alpha (`trained_lora_alpha`) and what produced the adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blockskip.errors import InputError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "transformer"


def lora_config_dict(rank: int, alpha: float, target_modules: list[str]) -> dict:
    """The peft LoraConfig fields diffusers reads back from an adapter file."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules),
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_dora": False}


def _lora_scale(config: dict) -> float:
    """peft's LoRA scale for a `lora_config_dict` config (one rank and alpha for every module)."""
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"):
        raise ValueError("adapter configs with rank_pattern, alpha_pattern or use_rslora are not supported")
    return float(config["lora_alpha"]) / int(config["r"])


def save_adapter(state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """Write the adapter atomically. `state_dict` is peft's (unscaled) LoRA state, keys are
    module paths without prefix as `get_peft_model_state_dict` returns them, trained with
    `config`; the file gets lora_B * alpha / r and a config with lora_alpha = r."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = _lora_scale(config)
    tensors = {}
    for key, value in state_dict.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter tensor {key} has non-finite values; refusing to write it")
        value = value.detach().to("cpu", torch.float32)
        tensors[f"{PREFIX}.{key}"] = (value * scale if ".lora_B." in key else value).contiguous()
    folded = {**config, "lora_alpha": int(config["r"])}
    metadata = {"format": "pt",
                "lora_adapter_metadata": json.dumps({f"{PREFIX}.{k}": v for k, v in folded.items()},
                                                    sort_keys=True)}
    tmp = out / f".{ADAPTER_FILE}.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out / ADAPTER_FILE)
    about = {**folded, "trained_lora_alpha": config["lora_alpha"], **(extra or {})}
    (out / CONFIG_FILE).write_text(json.dumps(about, indent=2, sort_keys=True))
    return out / ADAPTER_FILE


def adapter_file(path: str | Path) -> Path:
    """The adapter safetensors file of a folder (or the file itself)."""
    path = Path(path)
    candidate = path / ADAPTER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise InputError(f"no LoRA adapter at {str(path)!r} (expected {ADAPTER_FILE})")
    return candidate


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with `transformer.` keys, LoRA config without prefix) as stored: with peft,
    `LoraConfig(**config)` and these tensors (prefix removed) give the trained model."""
    file = adapter_file(path)
    tensors = {}
    with safe_open(str(file), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    config = {k.removeprefix(f"{PREFIX}."): v for k, v in json.loads(raw).items()} if raw else {}
    return tensors, config


def load_adapter(transformer, path: str | Path, adapter_name: str = "blockskip") -> None:
    """Load the adapter into a full diffusers transformer with diffusers' own loader."""
    file = adapter_file(path)
    transformer.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=PREFIX,
                                  adapter_name=adapter_name)


def adapter_hash(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256(adapter_file(path).read_bytes()).hexdigest()
    return digest[:16]

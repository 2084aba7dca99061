"""The LoRA adapter file: safetensors with the full model's diffusers/PEFT key names.

Keys are `transformer.<module path>.lora_A.weight` / `.lora_B.weight`, module paths exactly as in
the full diffusers transformer (e.g. `transformer.single_transformer_blocks.3.attn.to_q`), and
the LoRA config is stored the way diffusers' own `save_lora_weights` stores it (safetensors
metadata `lora_adapter_metadata`, keys prefixed `transformer.`), so both
`transformer.load_lora_adapter(dir, prefix="transformer")` and a pipeline's
`load_lora_weights(dir)` load it with no remapping.
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


def save_adapter(state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """Write the adapter atomically. `state_dict` keys are module paths without prefix,
    as peft's `get_peft_model_state_dict` returns them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter tensor {key} has non-finite values; refusing to write it")
        tensors[f"{PREFIX}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    metadata = {"format": "pt",
                "lora_adapter_metadata": json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()},
                                                    sort_keys=True)}
    tmp = out / f".{ADAPTER_FILE}.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out / ADAPTER_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({**config, **(extra or {})}, indent=2, sort_keys=True))
    return out / ADAPTER_FILE


def adapter_file(path: str | Path) -> Path:
    """The adapter safetensors file of a folder (or the file itself)."""
    path = Path(path)
    candidate = path / ADAPTER_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise InputError(f"no LoRA adapter at {str(path)!r} (expected {ADAPTER_FILE})")
    return candidate


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with `transformer.` keys, LoRA config without prefix)."""
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

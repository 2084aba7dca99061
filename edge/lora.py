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

`save_comfy_formats` writes the same LoRA with two more naming schemes (`train --format comfy`):
- `comfy_lora.safetensors`: `lora_transformer_<module path, "." -> "_">.lora_down/lora_up/alpha`
  (OneTrainer's naming). ComfyUI reads it; diffusers reads it for FLUX only when the LoRA is on
  attention projections alone (its converter maps no MLP keys of this naming).
- `kohya_lora.safetensors` (FLUX only): kohya sd-scripts' names, `lora_unet_double_blocks_<i>_
  img_attn_qkv`, `lora_unet_single_blocks_<i>_linear1`, ... on the original FLUX modules, where
  q, k, v (and a single block's MLP input) are one fused Linear: their LoRAs become one LoRA with
  the down weights stacked and the up weights block-diagonal (rank 3r, or 4r for `linear1`).
  ComfyUI, kohya's tools and diffusers (`FluxPipeline.load_lora_weights`, whose converter splits
  the fused LoRA back) read it. diffusers' converter splits `linear1` at FLUX.1's widths
  (3 x 3072 + 12288), so on a FLUX of another width a LoRA on single blocks does not load there.
Both store `alpha` = rank (scale 1), as the weights are already scaled.
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
COMFY_FILE = "comfy_lora.safetensors"
KOHYA_FILE = "kohya_lora.safetensors"
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


def _lora_pairs(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (down, up)} of an adapter file at scale 1 (an older file that kept alpha
    only in its metadata is scaled here)."""
    tensors, config = read_adapter(path)
    scale = _lora_scale(config) if config else 1.0
    pairs = {}
    for key, down in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix(f"{PREFIX}.").rsplit(".lora_A.", 1)[0]
            pairs[module] = (down, tensors[key.replace(".lora_A.", ".lora_B.")] * scale)
    return pairs


def _kohya_entry(out: dict, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """One LoRA in kohya's key style: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1


def comfy_state_dict(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`lora_transformer_<module path, "." -> "_">` keys (OneTrainer's naming, read by ComfyUI)."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in pairs.items():
        _kohya_entry(out, "lora_transformer_" + module.replace(".", "_"), down, up)
    return out


def kohya_state_dict(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     groups: dict[str, list[tuple[str, int]]]) -> dict[str, torch.Tensor]:
    """kohya sd-scripts' keys: one LoRA per original module of `groups` (`Family.kohya_groups`).
    A fused module gets down = [A_1; ...; A_k] and up = blockdiag(B_1, ..., B_k), a member with
    no LoRA a zero block, so (up @ down) restricted to member j's outputs is B_j @ A_j."""
    out: dict[str, torch.Tensor] = {}
    covered = set()
    for name, members in groups.items():
        present = [pairs[path] for path, _ in members if path in pairs]
        if not present:
            continue
        ranks = {down.shape[0] for down, _ in present}
        if len(ranks) != 1:
            raise InputError(f"LoRA ranks {sorted(ranks)} differ within the fused kohya module {name}")
        rank, in_features = ranks.pop(), present[0][0].shape[1:]
        downs, ups = [], []
        for path, out_features in members:
            down, up = pairs.get(path, (torch.zeros(rank, *in_features), torch.zeros(out_features, rank)))
            downs.append(down)
            ups.append(up)
            covered.add(path)
        _kohya_entry(out, name, torch.cat(downs), torch.block_diag(*ups))  # (k*r, in), (sum out, k*r)
    unnamed = sorted(set(pairs) - covered)
    if unnamed:
        raise InputError(f"no kohya name for the LoRA on {', '.join(unnamed)}; use the diffusers file")
    return out


def save_comfy_formats(path: str | Path, family) -> list[Path]:
    """Write the adapter in `path` also as `comfy_lora.safetensors` and, where the family has a
    kohya form (FLUX), `kohya_lora.safetensors`, next to it. Returns the files written."""
    pairs = _lora_pairs(path)
    out_dir = adapter_file(path).parent
    files = [(COMFY_FILE, comfy_state_dict(pairs))]
    groups = family.kohya_groups()
    if groups is not None:
        files.append((KOHYA_FILE, kohya_state_dict(pairs, groups)))
    written = []
    for name, tensors in files:
        tmp = out_dir / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / name)
        written.append(out_dir / name)
    return written


def adapter_hash(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256(adapter_file(path).read_bytes()).hexdigest()
    return digest[:16]

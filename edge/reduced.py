"""The edge's model: the full diffusers class built on the meta device, with only the kept
blocks and the head materialized from the kept weights (a subject bundle's base pack, or a single
bundle's own). Skipped blocks stay meta tensors
(no memory, no weights on the board) and are never run; module names stay the full model's,
so LoRA keys are the full model's keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from blockskip.errors import BundleError
from blockskip.features import WEIGHTS_FILE
from blockskip.models import family_class
from blockskip.models.skip import SkipPlan


def build_reduced(bundle_dir: str | Path, manifest: dict, device: str | torch.device = "cpu",
                  weights: str | Path | None = None):
    """(family adapter over the reduced model, skip plan) from a verified bundle. `weights`: the
    kept weights file (a subject bundle's base pack); default: the bundle's own (a single bundle)."""
    name = manifest["model"]["family"]
    cls = family_class(name)
    plan = SkipPlan.from_dict(manifest["plan"])
    config = manifest["transformer_config"]
    with torch.device("meta"):
        model = cls.model_cls(**config)
    weights = load_file(str(weights or Path(bundle_dir) / WEIGHTS_FILE), device=str(device))
    missing_unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing_unexpected.unexpected_keys:
        raise BundleError(f"kept weights hold keys the model does not have: {missing_unexpected.unexpected_keys[:5]}")
    family = cls(model.eval())
    if family.num_blocks != plan.num_blocks:
        raise BundleError(f"plan has {plan.num_blocks} blocks but the model config has {family.num_blocks}")
    needed = [family.block(i) for i in plan.kept]
    for module in needed:
        for pname, param in module.named_parameters():
            if param.is_meta:
                raise BundleError(f"bundle weights lack kept parameter {pname} of block {module.__class__.__name__}")
    for head in family.head_module_names():
        target = getattr(model, head)
        params = [target] if isinstance(target, torch.nn.Parameter) else list(target.parameters())
        if any(p.is_meta for p in params):
            raise BundleError(f"bundle weights lack the head module {head}")
    return family, plan


def materialized_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters that actually hold memory (meta tensors excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)

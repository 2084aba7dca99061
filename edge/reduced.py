"""The edge's model: the full diffusers class built on the meta device, with only the kept
blocks and the head materialized from the kept weights (a subject bundle's base pack, or a single
bundle's own). Skipped blocks stay meta tensors
(no memory, no weights on the board) and are never run; module names stay the full model's,
so LoRA keys are the full model's keys. A base pack with quantized weights (`quant` int8 / nf4)
turns each quantized Linear of the meta skeleton into a `blockskip.quant.QuantLinear` that holds
the file's quantized tensors: their full-precision weights are never allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockskip.errors import BundleError
from blockskip.features import WEIGHTS_FILE
from blockskip.models import family_class
from blockskip.models.skip import SkipPlan
from blockskip.quant import install_quantized


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
    path = str(weights or Path(bundle_dir) / WEIGHTS_FILE)
    weights = load_file(path, device=str(device))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    want = manifest.get("quant", "none")
    got = (metadata or {}).get("quant", "none")
    if got != want:
        raise BundleError(f"the kept weights are quantized as {got} but the bundle's plan says {want}: use the base "
                          f"pack made from the same plan")
    try:
        install_quantized(model, weights, metadata)
    except (KeyError, ValueError, AttributeError) as err:
        raise BundleError(f"the kept weights' {got} quantization is malformed: {err}") from err
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
    """Bytes of parameters and buffers that actually hold memory (meta tensors excluded)."""
    tensors = [*model.parameters(), *model.buffers()]  # buffers: quantized weights (and rotary tables)
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

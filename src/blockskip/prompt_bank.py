"""The prompt bank: text conditioning computed on the host, so a board generates with no text
encoder.

    <dir>/prompts/bank.safetensors   tensors "{i}/{text_key}", each with batch dimension 1
                                     (FLUX: encoder_hidden_states, pooled_projections;
                                      SANA: encoder_hidden_states, encoder_attention_mask)
                                     and, for families with classifier-free guidance (SANA),
                                     "negative/{text_key}": the empty prompt's conditioning
    <dir>/prompts/bank.json          {"prompts": [prompt 0, prompt 1, ...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blockskip.errors import InputError

BANK_TENSORS = "prompts/bank.safetensors"
BANK_INDEX = "prompts/bank.json"


def write_prompt_bank(path_dir: str | Path, model, prompts: list[str]) -> Path:
    """Encode `prompts` with `model.encode_text` and write both bank files under path_dir/prompts/."""
    if not prompts:
        raise InputError("a prompt bank needs at least one prompt")
    if len(set(prompts)) != len(prompts):
        raise InputError("the prompt bank has a prompt twice; give each prompt once")
    root = Path(path_dir)
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, prompt in enumerate(prompts):
        for key, value in model.encode_text(prompt).items():
            tensors[f"{i}/{key}"] = value.detach().cpu().contiguous()
    if model.family.cfg_scale != 1.0:
        for key, value in model.encode_text("").items():
            tensors[f"negative/{key}"] = value.detach().cpu().contiguous()
    tmp = root / (BANK_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(prompts))})
    os.replace(tmp, root / BANK_TENSORS)
    (root / BANK_INDEX).write_text(json.dumps({"prompts": list(prompts)}, indent=2))
    return root / BANK_TENSORS


def open_bank(bundle: str | Path, trust) -> Path:
    """The verified folder of a bundle (or bundle tar) whose prompt bank a generator reads: the
    board's TrustPolicy applies, and the bank files are checked against the signed manifest
    (the rest of a many-GiB bundle is not hashed, since generation reads nothing else)."""
    from blockskip.bundle import open_bundle

    return open_bundle(Path(bundle), trust, only=(BANK_INDEX, BANK_TENSORS))


def load_prompt_bank(bundle_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{prompt: {text_key: tensor}} from a bundle (or any folder with prompts/bank.*)."""
    root = Path(bundle_dir)
    index, tensors_file = root / BANK_INDEX, root / BANK_TENSORS
    if not index.is_file() or not tensors_file.is_file():
        raise InputError(f"{str(root)!r} has no prompt bank ({BANK_INDEX} and {BANK_TENSORS}); build the "
                         "bundle with prompts on the host, or give a model with a text encoder")
    prompts = json.loads(index.read_text()).get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{index} must hold {{\"prompts\": [str, ...]}}")
    flat = load_file(str(tensors_file))
    bank: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prompts}
    for key, value in flat.items():
        i, _, text_key = key.partition("/")
        if i == "negative":
            continue
        if not i.isdigit() or int(i) >= len(prompts):
            raise InputError(f"{tensors_file}: tensor {key!r} does not belong to any of the "
                             f"{len(prompts)} prompts of {index}")
        bank[prompts[int(i)]][text_key] = value
    empty = [p for p, v in bank.items() if not v]
    if empty:
        raise InputError(f"{tensors_file} has no tensors for prompt(s) {empty}")
    return bank


def load_negative(bundle_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The empty prompt's conditioning stored with the bank (None when the bank has none)."""
    tensors_file = Path(bundle_dir) / BANK_TENSORS
    if not tensors_file.is_file():
        return None
    flat = load_file(str(tensors_file))
    negative = {k.removeprefix("negative/"): v for k, v in flat.items() if k.startswith("negative/")}
    return negative or None

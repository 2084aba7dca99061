"""Base packs and subject bundles: the kept weights travel once per model and plan, the features
once per subject.

A *base pack* is a bundle (the sealed format of host/bundle.py: manifest, sha256 of every file,
optional ed25519 signature, optional tar) of kind `base-pack` that holds only `weights/`: the kept
blocks' and the head's base weights of one model + plan + precision + weight quantization
(`quant`: none, or the kept blocks' Linear weights in int8 / nf4, quantized on the host), with the
model family, config hash, transformer config, plan and quant in its manifest. It is built once
and installed on a board once.

A *subject bundle* (kind `subject`) holds everything else the cache step staged: feature shards,
per-prompt conditioning, the prompt bank, `bundle.json` (plan, patch schedule, LoRA settings, ...).
Its manifest names its base pack by the base pack manifest's `content_sha256` (which covers the
weights file's sha256), plus what explains a mismatch (family, config hash, kept blocks, precision,
weights sha256). The board trains a subject bundle only with exactly that base pack, and opens
both under its trust policy. Layout and messages: host/BUNDLE.md, "Base packs and subject bundles".
"""

from __future__ import annotations

import logging
from pathlib import Path

# What names a base pack and how a board finds one are blockskip.basepack; importable from here too.
from blockskip.basepack import (KIND_NAMES, WEIGHTS_FILE, describe, difference, find_base_pack,  # noqa: F401
                                reference, weights_for)
from blockskip.bundle import KIND_BASE_PACK, KIND_SUBJECT, MANIFEST, bundle_kind, verify_bundle
from blockskip.errors import InputError
from blockskip.files import sha256_file
from blockskip.host.bundle import _staged_files, build_bundle

logger = logging.getLogger(__name__)
BASE_DIR = "weights/"  # what goes into the base pack; everything else of staging goes into the subject bundle
DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64", "F8_E4M3": "fp8_e4m3",
               "F8_E5M2": "fp8_e5m2", "I8": "int8", "U8": "uint8"}


# ---------------------------------------------------------------- what names a base pack

def precision_of(weights: Path) -> str:
    """The storage dtype(s) of a weights file, e.g. "fp32" ("bf16+fp32" when mixed)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return "+".join(sorted(DTYPE_NAMES.get(d, d.lower()) for d in dtypes)) or "empty"


def base_pack_metadata(metadata: dict, precision: str) -> dict:
    """A base pack's manifest metadata from the cache step's (bundle.json): the model, its
    transformer config and the plan's kept blocks; not the subject's prompts or features."""
    missing = [key for key in ("model", "transformer_config", "plan") if key not in metadata]
    if missing:
        raise InputError(f"the staging metadata lacks {', '.join(missing)}: it does not come from `blockskip cache`")
    from blockskip.models.skip import SkipPlan

    plan = SkipPlan.from_dict(metadata["plan"])
    return {"kind": KIND_BASE_PACK,
            "model": {"family": metadata["model"]["family"], "config_hash": metadata["model"]["config_hash"]},
            "transformer_config": metadata["transformer_config"], "plan": plan.to_dict(), "precision": precision,
            "quant": metadata.get("quant", "none")}


# ---------------------------------------------------------------- host: build both

def _source_files(staging: Path) -> list[str]:
    """The files a split takes from STAGING: a cache staging folder, or a sealed single bundle
    (the old form, converted: its checksums are verified first)."""
    staging = Path(staging)
    if not staging.is_dir():
        raise InputError(f"staging folder {staging} does not exist or is not a folder")
    if not (staging / MANIFEST).exists():
        return _staged_files(staging)
    manifest = verify_bundle(staging)
    kind = bundle_kind(manifest)
    if kind != "single":
        raise InputError(f"{staging} is already a {KIND_NAMES[kind]}; split a cache staging folder or a "
                         f"single bundle")
    return sorted(manifest["files"])


def build_base_pack(staging: Path, out: Path, metadata: dict, signing_key: Path | None = None, tar: bool = False,
                    overwrite: bool = False) -> Path:
    """Seal staging's `weights/` (the kept weights `cache` wrote) as the base pack `out`."""
    staging = Path(staging)
    files = [rel for rel in _source_files(staging) if rel.startswith(BASE_DIR)]
    if WEIGHTS_FILE not in files:
        raise InputError(f"{staging} holds no {WEIGHTS_FILE}: a base pack is made from a `blockskip cache` staging "
                         f"folder (or a single bundle)")
    meta = base_pack_metadata(metadata, precision_of(staging / WEIGHTS_FILE))
    return build_bundle(staging, out, meta, signing_key=signing_key, tar=tar, overwrite=overwrite, files=files)


def build_subject_bundle(staging: Path, out: Path, metadata: dict, base_pack: Path, signing_key: Path | None = None,
                         tar: bool = False, overwrite: bool = False) -> Path:
    """Seal everything of staging except `weights/` as a subject bundle naming `base_pack`, whose
    weights must be the ones this staging's features were computed with."""
    staging = Path(staging)
    files = _source_files(staging)
    base_manifest = verify_bundle(base_pack)  # the host's own base pack: its checksums (a .tar in a temporary copy)
    if bundle_kind(base_manifest) != KIND_BASE_PACK:
        raise InputError(f"{base_pack} is not a base pack (it is a {KIND_NAMES[bundle_kind(base_manifest)]}); give "
                         f"the folder that `blockskip bundle --base-pack-out` wrote")
    ref = reference(base_manifest)
    if WEIGHTS_FILE not in files:
        raise InputError(f"{staging} holds no {WEIGHTS_FILE}, so it cannot be checked against the base pack")
    mine = reference({**base_pack_metadata(metadata, precision_of(staging / WEIGHTS_FILE)), "content_sha256": None,
                      "files": {WEIGHTS_FILE: {"sha256": sha256_file(staging / WEIGHTS_FILE)}}})
    if {k: v for k, v in mine.items() if k != "content_sha256"} != {k: v for k, v in ref.items()
                                                                      if k != "content_sha256"}:
        raise InputError(f"base pack {base_pack} ({describe(ref)}) does not fit {staging} ({describe(mine)}): "
                         f"{difference(mine, ref)}; make a new base pack with --base-pack-out")
    subject = {**metadata, "kind": KIND_SUBJECT, "base_pack": ref}
    return build_bundle(staging, out, subject, signing_key=signing_key, tar=tar, overwrite=overwrite,
                        files=[rel for rel in files if not rel.startswith(BASE_DIR)])

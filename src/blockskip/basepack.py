"""Reading base packs: what names one, how a subject bundle's base pack is found and checked.

A *base pack* is a bundle of kind `base-pack` holding only `weights/`: the kept blocks' and the
head's base weights of one model + plan + precision + weight quantization. A *subject bundle*
names its base pack by the base pack manifest's `content_sha256`, plus what explains a mismatch.
The board trains a subject bundle only with exactly that base pack, opened under its trust
policy. Building both is the host's (blockskip.host.basepack). Layout and messages:
host/BUNDLE.md, "Base packs and subject bundles".
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

from blockskip.bundle import KIND_BASE_PACK, KIND_SUBJECT, MANIFEST, TrustPolicy, _tar_member, bundle_kind, open_bundle
from blockskip.errors import BundleError

logger = logging.getLogger(__name__)
# blockskip.features.WEIGHTS_FILE, named here without importing torch (`blockskip verify` stays light)
WEIGHTS_FILE = "weights/kept_blocks.safetensors"
KIND_NAMES = {KIND_BASE_PACK: "base pack", KIND_SUBJECT: "subject bundle", "single": "single bundle"}


def reference(base_manifest: dict) -> dict:
    """What a subject bundle stores about its base pack: the identity (`content_sha256`) and what
    explains a mismatch."""
    weights = base_manifest["files"].get(WEIGHTS_FILE)
    if weights is None:
        raise BundleError(f"the base pack holds no {WEIGHTS_FILE}")
    return {"content_sha256": base_manifest["content_sha256"], "weights_sha256": weights["sha256"],
            "family": base_manifest["model"]["family"], "config_hash": base_manifest["model"]["config_hash"],
            "num_blocks": base_manifest["plan"]["num_blocks"], "kept": base_manifest["plan"]["kept"],
            "precision": base_manifest["precision"], "quant": base_manifest.get("quant", "none")}


def _ranges(blocks: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4, 7"."""
    parts, start = [], None
    for i, block in enumerate(blocks):
        start = block if start is None else start
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            parts.append(str(start) if start == block else f"{start}-{block}")
            start = None
    return ", ".join(parts)


def describe(ref: dict) -> str:
    quant = ref.get("quant", "none")
    return (f"{ref['family']} {ref['config_hash']}, kept blocks {_ranges(ref['kept'])} of {ref['num_blocks']}, "
            f"{ref['precision']}" + (f", Linear weights {quant}" if quant != "none" else ""))


def difference(wanted: dict, got: dict) -> str:
    """Why two base packs are not the same, in the words a user acts on."""
    if (wanted["family"], wanted["config_hash"]) != (got["family"], got["config_hash"]):
        return f"another model ({got['family']} {got['config_hash']}; the subject's: {wanted['family']} " \
               f"{wanted['config_hash']})"
    if (wanted["num_blocks"], wanted["kept"]) != (got["num_blocks"], got["kept"]):
        return f"another plan (kept blocks {_ranges(got['kept'])}; the subject's: {_ranges(wanted['kept'])})"
    if wanted.get("quant", "none") != got.get("quant", "none"):
        return f"another weight quantization ({got.get('quant', 'none')}; the subject's plan: " \
               f"{wanted.get('quant', 'none')}): make the base pack from a plan with the same --quant"
    if wanted["precision"] != got["precision"]:
        return f"another precision ({got['precision']}; the subject's: {wanted['precision']})"
    if wanted["weights_sha256"] != got["weights_sha256"]:
        return f"other weights of the same architecture and plan (weights sha256 {got['weights_sha256'][:16]}...; " \
               f"the subject's: {wanted['weights_sha256'][:16]}...)"
    return "another build of the same weights and plan (each build has its own identity)"



def _claimed(candidate: Path) -> dict | None:
    """A candidate's manifest as it claims to be (not verified yet), or None when unreadable."""
    try:
        data = _tar_member(candidate, MANIFEST) if candidate.is_file() else (candidate / MANIFEST).read_bytes()
        manifest = json.loads(data) if data else None
    except (OSError, BundleError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and bundle_kind(manifest) == KIND_BASE_PACK else None


def _is_pack(path: Path) -> bool:
    return (path.is_file() and tarfile.is_tarfile(path)) or (path / MANIFEST).is_file()


def _opened(subject: Path, wanted: dict, candidate: Path, trust: TrustPolicy) -> tuple[Path, dict]:
    """Open a candidate under the trust policy and check it is the base pack the subject names."""
    folder = open_bundle(candidate, trust)  # signature, content checksum and every file's sha256
    manifest = json.loads((folder / MANIFEST).read_text())
    if bundle_kind(manifest) != KIND_BASE_PACK:
        raise BundleError(f"{candidate} is a {KIND_NAMES[bundle_kind(manifest)]}, not a base pack; subject bundle "
                          f"{subject} needs base pack {wanted['content_sha256']} ({describe(wanted)})")
    got = reference(manifest)
    if got["content_sha256"] != wanted["content_sha256"]:
        raise BundleError(f"subject bundle {subject} needs base pack {wanted['content_sha256']} ({describe(wanted)}), "
                          f"but {candidate} is base pack {got['content_sha256']} ({describe(got)}): "
                          f"{difference(wanted, got)}. Install the base pack the subject bundle was made with, or "
                          f"rebuild the subject bundle against this one (`blockskip bundle STAGING --base-pack BASE`)")
    return folder, manifest


def find_base_pack(subject: Path, manifest: dict, where: Path | None, trust: TrustPolicy) -> Path:
    """The verified folder of the base pack a subject bundle names. `where` is that base pack
    (folder or .tar) or a folder of installed base packs, searched by content hash."""
    wanted = manifest["base_pack"]
    need = f"subject bundle {subject} needs base pack {wanted['content_sha256']} ({describe(wanted)})"
    if where is None:
        raise BundleError(f"{need}; say where it is installed (`--base-pack PATH`: the base pack, or a folder "
                          f"of installed base packs)")
    where = Path(where)
    if _is_pack(where):
        return _opened(subject, wanted, where, trust)[0]
    candidates = sorted(p for p in where.iterdir() if _is_pack(p)) if where.is_dir() else []
    others = []
    for candidate in candidates:
        claimed = _claimed(candidate)
        if claimed is None:
            continue
        if claimed.get("content_sha256") == wanted["content_sha256"]:
            return _opened(subject, wanted, candidate, trust)[0]
        try:
            why = difference(wanted, reference(claimed))
            others.append(f"{candidate.name}: base pack {claimed['content_sha256'][:16]}..., {why}")
        except (KeyError, TypeError):
            others.append(f"{candidate.name}: an unreadable base pack manifest")
    if others:
        found = "; ".join(others)
    elif where.is_dir():
        found = "no base packs there"
    else:
        found = "not a folder or a base pack" if where.exists() else "it does not exist"
    raise BundleError(f"{need}, which is not installed: looked in {where} ({found}). Install it there (copy the "
                      f"base pack folder or its .tar, e.g. `blockskip deploy BASE HOST:{where}/NAME`) or give its "
                      f"path (`--base-pack`)")


def weights_for(bundle: Path, manifest: dict, base_pack: Path | None, trust: TrustPolicy) -> tuple[Path, Path | None]:
    """(the kept weights file to train with, the base pack folder or None) for an opened bundle:
    a single bundle carries its weights; a subject bundle needs its base pack."""
    kind = bundle_kind(manifest)
    if kind == KIND_BASE_PACK:
        raise BundleError(f"{bundle} is a base pack ({describe(reference(manifest))}), not a subject bundle: train "
                          f"takes a subject bundle and finds this base pack by its hash (`--base-pack`)")
    if kind == "single":
        return Path(bundle) / WEIGHTS_FILE, None
    folder = find_base_pack(bundle, manifest, base_pack, trust)
    logger.info("subject bundle %s: base pack %s", bundle, folder)
    return folder / WEIGHTS_FILE, folder


def installed_base_packs(where: Path) -> list[str]:
    """The content hashes the base packs installed in `where` claim (checked in full when a job
    uses one); [] when there is no such folder."""
    if not where.is_dir():
        return []
    claimed = (_claimed(p) for p in sorted(where.iterdir()) if _is_pack(p))
    return sorted({c["content_sha256"] for c in claimed if c and isinstance(c.get("content_sha256"), str)})

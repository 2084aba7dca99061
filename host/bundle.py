"""Writing a bundle on the host: seal a staging folder, sign it, tar it; keys.

A bundle is a directory (or one plain tar of it) holding `manifest.json` and the files the
producer staged (kept blocks' weights, feature shards, prompt bank, JSON). The manifest lists
every other file with its sha256 and size; `manifest.sig`, when present, is an ed25519 signature
over the exact bytes of `manifest.json`. Reading and verifying it (the contract the board uses
too) is blockskip.bundle. Layout, manifest fields, signature format and every verification error
are documented in host/BUNDLE.md.

Their commands, `blockskip bundle` and `blockskip keygen`: host/seal.py (`blockskip verify`: blockskip/verify.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

# The reading side is blockskip.bundle; these names stay importable from here for host code.
from blockskip.bundle import (CHUNK, FORMAT, FORMAT_VERSION, KIND_BASE_PACK, KIND_SUBJECT, KINDS,  # noqa: F401
                              MANIFEST, OWN_KEYS, RESERVED, SIGNATURE, SPLIT_FORMAT_VERSION, TrustPolicy, _canonical,
                              _content_sha256, _fingerprint, _human, _read_key_file, _safe_rel,
                              _tar_member, bundle_kind, load_public_key, open_bundle, trust_from_args, unpack_bundle,
                              verify_bundle)
from blockskip.errors import ConfigError, InputError
from blockskip.files import sha256_file as _sha256_file, write_atomic  # noqa: F401 (_sha256_file: host callers)

logger = logging.getLogger(__name__)


def _copy_hashing(source: Path, target: Path) -> tuple[str, int]:
    """Copy one file and hash it in the same pass."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair as PEM (private: PKCS8, unencrypted, mode 0600; public:
    SubjectPublicKeyInfo). Never overwrites. Returns the public key's fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path} already exists; keygen never overwrites a key, choose another --out")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return _fingerprint(key.public_key())


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise InputError(f"{path}: the private key is encrypted; blockskip needs an unencrypted PEM "
                         f"key (protect it with file permissions)") from err
    except ValueError as err:
        hint = " (this is a public key; sign with the .key file)" if b"PUBLIC KEY" in data else ""
        raise InputError(f"{path}: not a PEM private key{hint}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: is a {type(key).__name__}, bundles are signed with ed25519 keys "
                         f"(make one with `blockskip keygen`)")
    return key


# ---------------------------------------------------------------- build

def _staged_files(staging: Path, reserved_ok: bool = False) -> list[str]:
    """Relative posix paths of every regular file under staging, sorted. With reserved_ok, a
    manifest at the root is listed instead of refused (the caller picks the files it takes)."""
    found = []
    for root, dirs, files in os.walk(staging):
        for name in sorted(dirs + files):
            path = Path(root) / name
            rel = path.relative_to(staging).as_posix()
            if path.is_symlink():
                raise InputError(f"{staging}: {rel} is a symbolic link; stage regular files only")
            if name in files and not stat.S_ISREG(path.lstat().st_mode):
                raise InputError(f"{staging}: {rel} is not a regular file")
            if name in files:
                found.append(rel)
    for name in RESERVED:
        if name in found and not reserved_ok:
            raise InputError(f"{staging}: {name} is reserved for the bundle itself; rename or remove it")
    return sorted(found)


def _check_out(path: Path, overwrite: bool, is_dir: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if is_dir and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{path} already exists; choose another --out or pass overwrite")


def build_bundle(staging: Path, out: Path, metadata: dict, signing_key: Path | None = None,
                 tar: bool = False, overwrite: bool = False, files: list[str] | None = None) -> Path:
    """Copy staging's files into a new bundle directory `out`, write manifest.json (and
    manifest.sig when signing_key is given); with tar=True also write `out.tar`. Returns out.
    `files` (relative posix paths) takes only those files of staging; default: all of them.
    A `kind` in the metadata (base-pack, subject: host/basepack.py) makes it a format 2 bundle.

    The bundle is assembled in a hidden sibling folder and renamed into place, so an
    interrupted build never leaves something that looks like a bundle.
    """
    staging, out = Path(staging), Path(out)
    if not staging.is_dir():
        raise InputError(f"staging folder {staging} does not exist or is not a folder")
    if not isinstance(metadata, dict):
        raise ConfigError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    clash = sorted(set(metadata) & set(OWN_KEYS))
    if clash:
        raise ConfigError(f"metadata may not set {', '.join(clash)}: the bundle writes those fields itself")
    if "kind" in metadata and metadata["kind"] not in KINDS:
        raise ConfigError(f"metadata kind {metadata['kind']!r} is not a bundle kind ({', '.join(KINDS)}); "
                          f"leave `kind` out for a single bundle")
    tar_path = out.with_name(out.name + ".tar")
    _check_out(out, overwrite, is_dir=True)
    if tar:
        _check_out(tar_path, overwrite, is_dir=False)
    key = load_private_key(signing_key) if signing_key is not None else None
    names = _staged_files(staging, reserved_ok=files is not None)
    if files is not None:
        missing = sorted(set(files) - set(names))
        if missing:
            raise InputError(f"staging folder {staging} lacks {', '.join(missing[:5])}")
        if set(files) & set(RESERVED):
            raise InputError(f"{', '.join(RESERVED)} are written by the bundle itself; do not pass them in files")
        names = sorted(set(files))
    if not names:
        raise InputError(f"staging folder {staging} holds no files; run the cache step first")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = {}
        for rel in names:
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            sha256, size = _copy_hashing(staging / rel, target)
            files[rel] = {"sha256": sha256, "size": size}
        version = SPLIT_FORMAT_VERSION if "kind" in metadata else FORMAT_VERSION
        manifest = {**metadata, "format": FORMAT, "format_version": version,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
        try:
            manifest["content_sha256"] = _content_sha256(manifest)
            manifest_bytes = _canonical(manifest)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"metadata is not plain JSON (objects, lists, strings, finite numbers): {err}") from err
        write_atomic(work / MANIFEST, manifest_bytes)
        if key is not None:
            signature = base64.b64encode(key.sign(manifest_bytes)) + b"\n"
            write_atomic(work / SIGNATURE, signature)
            logger.info("signed %s with %s", out, _fingerprint(key.public_key()))
        os.chmod(work, 0o755)
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if tar:
        _write_tar(out, tar_path, names)
    return out


def _write_tar(bundle: Path, tar_path: Path, names: list[str]) -> None:
    """A plain, reproducible tar: manifest first, then signature, then files sorted; regular files
    only, with zeroed owner and time, so the same bundle always gives the same bytes."""
    members = [MANIFEST] + ([SIGNATURE] if (bundle / SIGNATURE).exists() else []) + names
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
        for rel in members:
            info = tarfile.TarInfo(rel)
            info.size = (bundle / rel).stat().st_size
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
            with open(bundle / rel, "rb") as handle:
                archive.addfile(info, handle)
    os.replace(tmp, tar_path)


# ---------------------------------------------------------------- command line

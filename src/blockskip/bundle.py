"""Reading a bundle: the format's constants, verification, the board's trust policy, unpacking.

A bundle is a directory (or one plain tar of it) holding `manifest.json` and the files the
producer staged (kept blocks' weights, feature shards, prompt bank, JSON). The manifest lists
every other file with its sha256 and size; `manifest.sig`, when present, is an ed25519 signature
over the exact bytes of `manifest.json`. This module is the contract both sides share: the host
writes bundles with blockskip.host.bundle, the board opens them here (`open_bundle` under its
`TrustPolicy`) and never needs the host's code. Layout, manifest fields, signature format and
every verification error are documented in host/BUNDLE.md.

The command that checks one: `blockskip verify` (blockskip/verify.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from blockskip.errors import BundleError, ConfigError, InputError
from blockskip.files import sha256_file

FORMAT = "blockskip-bundle"
# 1: a self-contained single bundle (weights and features in one). 2: a base pack or a subject
# bundle (`kind`), which older blockskip versions refuse by their version instead of misreading.
FORMAT_VERSION = 1
SPLIT_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, SPLIT_FORMAT_VERSION)
KIND_BASE_PACK = "base-pack"  # the kept blocks' and head's weights of one model + plan (host/basepack.py)
KIND_SUBJECT = "subject"  # one subject's features, naming its base pack by content hash
KINDS = (KIND_BASE_PACK, KIND_SUBJECT)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
# Manifest keys that the bundle itself owns; producer metadata may not use them.
OWN_KEYS = ("format", "format_version", "created", "files", "content_sha256")
CHUNK = 1 << 20  # hash and copy in 1 MiB chunks: feature shards can be many GiB


# ---------------------------------------------------------------- manifest bytes and hashing

def _canonical(data: dict, compact: bool = False) -> bytes:
    if compact:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return text.encode("ascii")
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def _content_sha256(manifest: dict) -> str:
    """Checksum of the manifest's own content, so that an unsigned manifest is also tamper-evident."""
    body = {key: value for key, value in manifest.items() if key != "content_sha256"}
    return hashlib.sha256(_canonical(body, compact=True)).hexdigest()


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- keys

def _fingerprint(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from err


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        hint = " (this is a private key; verify with the .pub file)" if b"PRIVATE KEY" in data else ""
        raise InputError(f"{path}: not a PEM public key{hint}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path}: is a {type(key).__name__}, bundles are signed with ed25519 keys")
    return key


def bundle_kind(manifest: dict) -> str:
    """The manifest's kind: base-pack, subject, or single (the self-contained form, format 1)."""
    return manifest.get("kind", "single") if manifest.get("format_version") == SPLIT_FORMAT_VERSION else "single"


# ---------------------------------------------------------------- verify

def _safe_rel(name: str) -> bool:
    path = PurePosixPath(name)
    return (bool(name) and not path.is_absolute() and "\\" not in name and ":" not in path.parts[0]
            and all(part not in ("", ".", "..") for part in name.split("/")))


def _read_signature(root: Path) -> bytes | None:
    """The 64 signature bytes of manifest.sig, or None when the bundle is unsigned."""
    sig_path = root / SIGNATURE
    if not (sig_path.exists() or sig_path.is_symlink()):
        return None
    if sig_path.is_symlink() or not sig_path.is_file():
        raise BundleError(f"{SIGNATURE} is not a regular file")
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleError(f"{SIGNATURE} is malformed: not base64 ({err})") from err
    if len(signature) != 64:
        raise BundleError(f"{SIGNATURE} is malformed: an ed25519 signature is 64 bytes, got {len(signature)}")
    return signature


def _check_signature(manifest_bytes: bytes, root: Path, keys: tuple[Path, ...], require: bool) -> str | None:
    """Check manifest.sig against `keys` (any one may have signed). Returns the fingerprint of the
    key that verified, or None when nothing was checked (unsigned and not required, or no key)."""
    signature = _read_signature(root)
    if signature is None:
        if require:
            raise BundleError("bundle is not signed but a signature is required")
        if keys:
            raise BundleError(f"bundle is not signed, so it cannot be verified with key {keys[0]}")
        return None
    if not keys:
        if require:
            raise BundleError("a signature is required but no public key was given to check it (--key)")
        return None
    from cryptography.exceptions import InvalidSignature

    loaded = [(path, load_public_key(path)) for path in keys]
    for _, key in loaded:
        try:
            key.verify(signature, manifest_bytes)
            return _fingerprint(key)
        except InvalidSignature:
            continue
    names = ", ".join(f"{path} ({_fingerprint(key)})" for path, key in loaded)
    which = "key" if len(loaded) == 1 else "any of the keys"
    raise BundleError(f"signature does not verify with {which} {names}: the manifest was changed or signed "
                      f"with another key")


@dataclass(frozen=True)
class TrustPolicy:
    """Which bundles a board uses: one policy for every path that opens a bundle (`train`,
    `generate --bundle`, `export --bundle`, the agent, library calls).

    A bundle is accepted when its signature verifies with one of `keys`. An unsigned bundle, or
    one signed when no key is configured, is accepted only with `allow_unsigned`; a bundle whose
    signature fails against the configured keys is always refused. The default policy (no keys,
    unsigned not allowed) refuses every bundle with a message that says what to configure.
    """

    keys: tuple[Path, ...] = ()  # trusted ed25519 public keys (PEM, from `blockskip keygen`)
    allow_unsigned: bool = False  # accept bundles without a checked signature (say so plainly)

    def __post_init__(self):
        object.__setattr__(self, "keys", tuple(Path(k) for k in self.keys))
        for path in self.keys:
            load_public_key(path)  # fail now, naming the file, not at the first bundle

    def check(self, manifest_bytes: bytes, root: Path) -> str:
        """Raise BundleError unless the bundle at root (manifest bytes already read) is trusted;
        returns how it was trusted, for logs and reports."""
        if not self.keys and not self.allow_unsigned:
            raise BundleError("no trusted public key is configured, so no bundle is trusted: give the host's "
                              "public key (`--key host.pub`, or `trusted_keys` in agent.yaml), or accept "
                              "unsigned bundles plainly (`--allow-unsigned`, `allow_unsigned_bundles: true`)")
        signature = _read_signature(root)
        if signature is None:
            if not self.allow_unsigned:
                raise BundleError("bundle is not signed, and unsigned bundles are not allowed (sign it on the host "
                                  "with `blockskip bundle --sign host.key`, or allow unsigned bundles plainly)")
            return "unsigned (allowed by the trust policy)"
        if not self.keys:
            return "signature not checked (no trusted key; unsigned bundles allowed)"
        return "signed by " + str(_check_signature(manifest_bytes, root, self.keys, require=True))


def trust_policy_from(trusted_keys: object, allow_unsigned: object) -> TrustPolicy:
    """The policy of an agent configuration's `trusted_keys` and `allow_unsigned_bundles`
    (ConfigError naming the key when either is malformed or a key file cannot be read)."""
    if not isinstance(trusted_keys, list) or not all(isinstance(k, str) and k for k in trusted_keys):
        raise ConfigError("trusted_keys must be a list of public key file paths")
    if not isinstance(allow_unsigned, bool):
        raise ConfigError("allow_unsigned_bundles must be true or false")
    try:
        return TrustPolicy(tuple(Path(k) for k in trusted_keys), allow_unsigned)
    except InputError as err:
        raise ConfigError(f"trusted_keys: {err}") from err


def trust_from_config(path: Path) -> TrustPolicy:
    """The trust policy of an agent configuration file (`trusted_keys`, `allow_unsigned_bundles`),
    so that the CLI on a board applies the same policy as its agent."""
    from blockskip.config import load_yaml

    data = load_yaml(Path(path))
    return trust_policy_from(data.get("trusted_keys", []), data.get("allow_unsigned_bundles", False))


def add_trust_arguments(parser) -> None:
    """--key / --allow-unsigned / --trust-config, the same on every command that opens a bundle."""
    parser.add_argument("--key", action="append", default=[], type=Path, metavar="PUB",
                        help="trusted ed25519 public key (PEM, from `blockskip keygen`); the bundle must be "
                             "signed by one of them (repeatable)")
    parser.add_argument("--trust-config", type=Path, metavar="AGENT_YAML",
                        help="take the trusted keys (and allow_unsigned_bundles) from this agent "
                             "configuration: the same policy as the board's agent")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="also accept bundles whose signature is not checked (unsigned, or no key given)")


def trust_from_args(args) -> TrustPolicy:
    """The TrustPolicy named by add_trust_arguments' options."""
    keys, allow = list(args.key), bool(args.allow_unsigned)
    if args.trust_config is not None:
        from_config = trust_from_config(args.trust_config)
        keys += list(from_config.keys)
        allow = allow or from_config.allow_unsigned
    return TrustPolicy(tuple(keys), allow)


def _parse_manifest(manifest_bytes: bytes) -> dict:
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{MANIFEST} is not valid JSON ({err}); the bundle is corrupt") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} is not a blockskip bundle manifest (format is not {FORMAT!r})")
    try:
        canonical, content_sha256 = _canonical(manifest), _content_sha256(manifest)
    except ValueError as err:
        raise BundleError(f"{MANIFEST} holds non-finite numbers ({err}); the bundle is corrupt") from err
    if manifest.get("content_sha256") != content_sha256:
        raise BundleError(f"{MANIFEST}: content checksum mismatch (expected {manifest.get('content_sha256')}, "
                          f"got {content_sha256}); the manifest was edited or corrupted")
    version = manifest.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise BundleError(f"{MANIFEST}: format_version {version!r} is not supported by this blockskip "
                          f"(supports {', '.join(map(str, FORMAT_VERSIONS))}); update blockskip or rebuild the bundle")
    if version == SPLIT_FORMAT_VERSION and manifest.get("kind") not in KINDS:
        raise BundleError(f"{MANIFEST}: kind {manifest.get('kind')!r} is not known to this blockskip "
                          f"(knows {', '.join(KINDS)}); update blockskip")
    if manifest_bytes != canonical:
        raise BundleError(f"{MANIFEST} is not byte-for-byte as written (whitespace or escaping changed); "
                          f"the manifest was edited or corrupted")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()):
        raise BundleError(f"{MANIFEST}: `files` must map each path to {{sha256, size}}")
    for rel in files:
        if not _safe_rel(rel) or rel in RESERVED:
            raise BundleError(f"{MANIFEST} lists an unsafe path {rel!r} (absolute, '..' or reserved)")
    return manifest


def _present_files(root: Path) -> set[str]:
    present = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{rel} is a symbolic link; a bundle holds regular files only")
            if name in files:
                if not stat.S_ISREG(mode):
                    raise BundleError(f"{rel} is not a regular file")
                present.add(rel)
    return present


def _as_keys(public_key) -> tuple[Path, ...]:
    if public_key is None:
        return ()
    if isinstance(public_key, (str, Path)):
        return (Path(public_key),)
    return tuple(Path(k) for k in public_key)


def verify_bundle(path: Path, public_key: Path | list[Path] | None = None, require_signature: bool = False) -> dict:
    """Check a bundle directory (or a .tar, unpacked into a temporary folder) and return its manifest.

    An inspection (`blockskip verify`): without a key, a signature is not checked. Code that USES a
    bundle opens it with `open_bundle(path, trust)`, which applies the board's TrustPolicy.
    Raises BundleError naming the first structural problem, or every missing, unexpected, resized
    and changed file at once.
    """
    path = Path(path)
    keys = _as_keys(public_key)

    def check(manifest_bytes: bytes, root: Path) -> None:
        _check_signature(manifest_bytes, root, keys, require_signature)

    if path.is_file() and tarfile.is_tarfile(path):
        with tempfile.TemporaryDirectory(prefix="blockskip-verify-") as tmp:
            return _verify_dir(unpack_bundle(path, Path(tmp) / "bundle", verify=False, check_signature=check), check)
    return _verify_dir(path, check)


def _verify_dir(root: Path, check_signature, only: tuple[str, ...] | None = None) -> dict:
    """Verify the folder; `check_signature(manifest_bytes, root)` raises when it is not trusted.
    With `only`, just those listed files are checked (a reader that uses nothing else)."""
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle folder or tar")
    manifest_path = root / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; this is not a bundle (or an incomplete one)")
    manifest_bytes = manifest_path.read_bytes()
    check_signature(manifest_bytes, root)
    manifest = _parse_manifest(manifest_bytes)
    listed = manifest["files"]
    if only is None:
        present = _present_files(root) - set(RESERVED)
        problems = [f"missing file {rel}" for rel in sorted(set(listed) - present)]
        problems += [f"unexpected file {rel} not listed in the manifest" for rel in sorted(present - set(listed))]
        checked = sorted(set(listed) & present)
    else:
        problems, checked = [], []
        for rel in only:  # unlisted and absent is fine: the reader says what it misses
            target = root / rel
            on_disk = target.exists() or target.is_symlink()
            if rel not in listed:
                if on_disk:
                    problems.append(f"unexpected file {rel} not listed in the manifest")
            elif not on_disk:
                problems.append(f"missing file {rel}")
            elif target.is_symlink() or not target.is_file():
                problems.append(f"{rel} is not a regular file")
            else:
                checked.append(rel)
    for rel in checked:
        entry = listed[rel]
        size = (root / rel).stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size mismatch (expected {entry['size']} bytes, got {size})")
            continue
        sha256 = sha256_file(root / rel)
        if sha256 != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (expected {entry['sha256']}, got {sha256})")
    if problems:
        shown = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(shown))
    return manifest


# ---------------------------------------------------------------- unpack

DISK_MARGIN = 256 << 20  # an unpacked bundle leaves at least this much of its file system free
MAX_MANIFEST_BYTES = 64 << 20  # a manifest (or its signature) larger than this is not read
EXTRACTABLE = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo | None, tar_path: Path) -> bytes | None:
    if member is None:
        return None
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{tar_path}: {member.name} is {_human(member.size)}, over the "
                          f"{_human(MAX_MANIFEST_BYTES)} a manifest may have")
    handle = archive.extractfile(member)
    return handle.read() if handle else None


def _check_members(archive: tarfile.TarFile, members: list[tarfile.TarInfo], tar_path: Path, dest: Path,
                   check_signature, max_bytes: int | None) -> None:
    """Everything a tar must pass before its first byte is written: only regular files and folders
    (no links, devices or sparse members, which expand on extraction), safe names, the manifest's
    signature under the caller's policy, every file listed in the manifest at its listed size, and
    the sum of the declared sizes within `max_bytes` and the free space."""
    base = dest.resolve()
    seen: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in members:
        name = member.name
        if name.startswith("/") or PurePosixPath(name).is_absolute():
            raise BundleError(f"{tar_path}: member {name!r} has an absolute path")
        if ".." in name.split("/") or "\\" in name:
            raise BundleError(f"{tar_path}: member {name!r} has a '..' component")
        if member.type not in EXTRACTABLE or member.issparse():
            kind = ("a symlink" if member.issym() else "a hardlink" if member.islnk()
                    else "a sparse file" if member.issparse() else "not a regular file")
            raise BundleError(f"{tar_path}: member {name!r} is {kind}; bundles hold regular files only")
        target = (base / name).resolve()
        if target != base and base not in target.parents:
            raise BundleError(f"{tar_path}: member {name!r} resolves outside {dest}")
        rel = target.relative_to(base).as_posix()
        if member.isreg():
            if rel in seen:
                raise BundleError(f"{tar_path}: member {name!r} appears twice")
            seen[rel] = member
            total += member.size
    manifest_bytes = _member_bytes(archive, seen.get(MANIFEST), tar_path)
    if manifest_bytes is None:
        raise BundleError(f"{tar_path}: no {MANIFEST}; this is not a bundle (or an incomplete one)")
    if check_signature is not None:  # the policy looks at the manifest before anything is unpacked
        with tempfile.TemporaryDirectory(prefix="blockskip-sig-") as peek:
            signature = _member_bytes(archive, seen.get(SIGNATURE), tar_path)
            if signature is not None:
                (Path(peek) / SIGNATURE).write_bytes(signature)
            check_signature(manifest_bytes, Path(peek))
    listed = _parse_manifest(manifest_bytes)["files"]
    for rel, member in seen.items():
        if rel in RESERVED:
            continue
        if rel not in listed:
            raise BundleError(f"{tar_path}: member {rel!r} is not listed in the manifest")
        if member.size != listed[rel]["size"]:
            raise BundleError(f"{tar_path}: member {rel!r} declares {member.size} bytes; the manifest lists "
                              f"{listed[rel]['size']}")
    if max_bytes is not None and total > max_bytes:
        raise BundleError(f"{tar_path} unpacks to {_human(total)}, over the limit of {_human(max_bytes)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if total + DISK_MARGIN > free:
        raise BundleError(f"{tar_path} unpacks to {_human(total)}; {dest.parent} has {_human(free)} free and keeps "
                          f"{_human(DISK_MARGIN)} spare: free some space first")


def unpack_bundle(tar_path: Path, dest: Path, verify: bool = True, public_key: Path | None = None,
                  require_signature: bool = False, check_signature=None, max_bytes: int | None = None) -> Path:
    """Extract a bundle tar into dest (which must not exist or be empty), then verify it.

    Every member is checked before anything is written (`_check_members`): absolute paths, '..'
    components, links, devices, sparse members and anything resolving outside dest are rejected
    with a BundleError naming the member; so is a member the manifest does not list at its size,
    and a sum of sizes over `max_bytes` or the free space. `check_signature(manifest_bytes, root)`,
    when given, judges the manifest and its signature first (open_bundle passes the trust policy).
    """
    tar_path, dest = Path(tar_path), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"cannot unpack into {dest}: it exists and is not an empty folder")
    try:
        archive = tarfile.open(tar_path, "r:")
    except (OSError, tarfile.TarError) as err:
        raise BundleError(f"{tar_path} is not a readable tar ({err})") from err
    with archive:
        try:
            members = archive.getmembers()
            _check_members(archive, members, tar_path, dest, check_signature, max_bytes)
        except tarfile.TarError as err:
            raise BundleError(f"{tar_path} is corrupt ({err})") from err
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for member in members:
                target = work / member.name
                try:
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.extractfile(member) as src, open(target, "xb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                except (OSError, tarfile.TarError) as err:
                    raise BundleError(f"{tar_path}: cannot extract member {member.name!r} ({err})") from err
            os.chmod(work, 0o755)
            if dest.exists():
                dest.rmdir()
            os.replace(work, dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    if verify:
        verify_bundle(dest, public_key, require_signature)
    return dest


def _tar_member(tar_path: Path, name: str) -> bytes | None:
    try:
        with tarfile.open(tar_path, "r:") as archive:
            try:
                member = archive.getmember(name)
            except KeyError:
                return None
            handle = archive.extractfile(member)
            return handle.read() if handle else None
    except (OSError, tarfile.TarError) as err:
        raise BundleError(f"{tar_path} is not a readable tar ({err})") from err


def _file_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() and not path.is_symlink() else None


def open_bundle(path: Path, trust: TrustPolicy, cache_dir: Path | None = None,
                only: tuple[str, ...] | None = None, max_bytes: int | None = None) -> Path:
    """The bundle folder to use, from a folder or a .tar, after the board's trust policy and the
    checksums passed. Every code path that uses a bundle comes through here.

    A tar X.tar is unpacked into `cache_dir/X` (default: the sibling folder X) and checked there; if
    that folder already exists it is used only when its manifest.json and manifest.sig are the
    tar's own bytes, and it is then checked like any folder, so what is used is what the tar
    holds. With `only`, just those files are hashed (a generator that reads only the prompt bank);
    the manifest, its signature and those files are checked all the same. The trust policy judges
    a tar's manifest before anything is unpacked; `max_bytes` bounds what it may unpack to.
    """
    if not isinstance(trust, TrustPolicy):
        raise TypeError("open_bundle needs a TrustPolicy (which keys the board trusts)")
    path = Path(path)
    if path.is_dir():
        _verify_dir(path, trust.check, only)
        return path
    if not path.is_file():
        raise InputError(f"bundle {path} does not exist")
    if not tarfile.is_tarfile(path):
        raise BundleError(f"{path} is neither a bundle folder nor a tar")
    name = path.name[:-4] if path.name.endswith(".tar") else path.name + ".d"
    dest = (Path(cache_dir) if cache_dir is not None else path.parent) / name
    if dest.is_dir() and any(dest.iterdir()):
        tar_manifest = _tar_member(path, MANIFEST)
        same = (tar_manifest is not None and _file_or_none(dest / MANIFEST) == tar_manifest
                and _file_or_none(dest / SIGNATURE) == _tar_member(path, SIGNATURE))
        if not same:
            raise BundleError(f"{dest} exists and holds something other than {path} (its manifest or signature "
                              f"differs); remove it or pass another cache folder")
        _verify_dir(dest, trust.check, only)
        return dest
    unpack_bundle(path, dest, verify=False, check_signature=trust.check, max_bytes=max_bytes)
    try:
        _verify_dir(dest, trust.check, only)
    except BundleError:
        shutil.rmtree(dest, ignore_errors=True)  # nothing untrusted stays where it could be mistaken for a bundle
        raise
    return dest

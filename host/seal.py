"""`blockskip bundle` and `blockskip keygen`: seal what `blockskip cache` staged into a base pack
and a subject bundle (or one single bundle), signed with the host's key. The sealing itself is
blockskip.host.bundle and blockskip.host.basepack; the format and its reading, blockskip.bundle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blockskip.bundle import MANIFEST, _fingerprint, _human
from blockskip.errors import InputError
from blockskip.host import basepack
from blockskip.host.bundle import build_bundle, generate_keypair, load_private_key


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bundle", help="pack a staging folder into a checksummed (optionally signed) bundle",
        description="Seal the staging folder that `blockskip cache` filled. Two artifacts: a base pack (the kept "
                    "blocks' and head's weights of one model and plan: built once, installed on a board once) "
                    "and a subject bundle (features, prompt bank, plan, patch schedule, LoRA settings: one per "
                    "subject) that names its base pack by content hash. The first subject of a model and plan "
                    "writes both (--base-pack-out BASE --out SUBJECT); later subjects name the existing one "
                    "(--base-pack BASE --out SUBJECT), whose weights must be the staging's. --single writes the "
                    "older self-contained bundle (weights inside). Each bundle folder gets manifest.json with the "
                    "sha256 and size of each file, and manifest.sig with --sign. STAGING may also be a single "
                    "bundle, to split it. The metadata (model family and config, plan, patch schedule, LoRA config, "
                    "sample count) comes from --metadata or, by default, STAGING/bundle.json, which stays in the "
                    "(subject) bundle as a listed file. Prints the size of each artifact. See host/BUNDLE.md.")
    parser.add_argument("staging", type=Path, metavar="STAGING",
                        help="folder the cache step filled (or a single bundle to split)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="subject bundle folder to create (with --single: the single bundle)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--base-pack-out", type=Path, metavar="BASE",
                      help="also write the base pack BASE from the staging's weights (once per model and plan)")
    form.add_argument("--base-pack", type=Path, metavar="BASE",
                      help="an existing base pack (folder or .tar) the subject bundle names; its weights must be "
                           "the staging's (same model and plan)")
    form.add_argument("--single", action="store_true",
                      help="one self-contained bundle with the weights inside (for boards without base packs)")
    parser.add_argument("--tar", action="store_true", help="also write DIR.tar (and BASE.tar): plain, reproducible")
    parser.add_argument("--sign", type=Path, metavar="KEY",
                        help="ed25519 private key (PEM) from `blockskip keygen`; signs every artifact written")
    parser.add_argument("--metadata", type=Path, metavar="JSON_FILE",
                        help="JSON object of manifest metadata (default: STAGING/bundle.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR (BASE, and their .tar)")
    parser.set_defaults(func=run_bundle)

    parser = subparsers.add_parser(
        "keygen", help="create an ed25519 key pair for signing bundles",
        description="Write PREFIX.key (private, PEM, mode 0600: keep it on the host) and PREFIX.pub "
                    "(public, PEM: copy it to the boards). Existing files are never overwritten.")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="path prefix of the two key files")
    parser.set_defaults(func=run_keygen)


def _read_metadata(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise InputError(f"metadata file {path} does not exist (run the cache step or pass --metadata)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"metadata file {path} is not readable JSON: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"metadata file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _summary(folder: Path) -> tuple[int, int]:
    files = json.loads((folder / MANIFEST).read_text())["files"]
    return len(files), sum(entry["size"] for entry in files.values())


def run_bundle(args: argparse.Namespace) -> int:

    if not (args.base_pack_out or args.base_pack or args.single):
        raise InputError("say where the kept weights go: --base-pack-out BASE (write the base pack: the first "
                         "subject of this model and plan), --base-pack BASE (an existing base pack), or --single "
                         "(one bundle with the weights inside)")
    metadata = _read_metadata(args.metadata or args.staging / "bundle.json")
    common = dict(signing_key=args.sign, tar=args.tar, overwrite=args.overwrite)
    signed = f"signed with {_fingerprint(load_private_key(args.sign).public_key())}" if args.sign else "unsigned"

    def tar_note(folder: Path) -> str:
        return f"; tar {folder.with_name(folder.name + '.tar')}" if args.tar else ""

    if args.single:
        out = build_bundle(args.staging, args.out, metadata, files=basepack._source_files(args.staging), **common)
        count, total = _summary(out)
        print(f"wrote single bundle {out}: {count} files, {_human(total)} (the kept weights inside), "
              f"{signed}{tar_note(out)}")
        return 0
    if args.base_pack_out:
        base = basepack.build_base_pack(args.staging, args.base_pack_out, metadata, **common)
        count, total = _summary(base)
        print(f"wrote base pack {base}: {count} file{'s' if count > 1 else ''}, {_human(total)}, {signed}"
              f"{tar_note(base)}; install it once on each board (beside its subject bundles or in the agent's "
              f"base-packs folder)")
    else:
        base = args.base_pack
        count, total = _summary(base) if base.is_dir() else (1, base.stat().st_size if base.is_file() else 0)
    out = basepack.build_subject_bundle(args.staging, args.out, metadata, base, **common)
    manifest = json.loads((out / MANIFEST).read_text())
    subject_count, subject_total = _summary(out)
    if args.base_pack:
        print(f"base pack {base}: {_human(total)}, {manifest['base_pack']['content_sha256'][:16]}... (not rewritten)")
    print(f"wrote subject bundle {out}: {subject_count} files, {_human(subject_total)}, {signed}{tar_note(out)}; "
          f"needs base pack {manifest['base_pack']['content_sha256'][:16]}... on the board")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    private_path, public_path = Path(args.out + ".key"), Path(args.out + ".pub")
    fingerprint = generate_keypair(private_path, public_path)
    print(f"wrote {private_path} (private, keep it secret) and {public_path} (public); {fingerprint}")
    return 0

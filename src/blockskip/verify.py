"""`blockskip verify`: a board (or anyone) checks a bundle's checksums and signature before using it;
no host code needed."""

from __future__ import annotations

import argparse
from pathlib import Path

from blockskip.basepack import describe, reference
from blockskip.bundle import (KIND_BASE_PACK, KIND_SUBJECT, SIGNATURE, _fingerprint, _human, bundle_kind,
                              load_public_key, verify_bundle)


def register(subparsers) -> None:
    """Add `blockskip verify` (a board checks a bundle with it: no host code needed)."""
    parser = subparsers.add_parser(
        "verify", help="check a bundle's checksums (and signature) before using it",
        description="Check that BUNDLE (a subject bundle, base pack or single bundle; a folder or a .tar) holds "
                    "exactly the files its manifest lists, with matching sizes and sha256, no links and no extra "
                    "files; with --key also check the ed25519 signature. Prints OK with what it is (a base pack "
                    "with its content hash, or the base pack hash a subject bundle needs), or the problem (exit "
                    "code 2).")
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle folder or .tar")
    parser.add_argument("--key", type=Path, metavar="PUB", help="public key (PEM) to check the signature with")
    parser.add_argument("--require-signature", action="store_true",
                        help="fail when the bundle is not signed (needs --key)")
    parser.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    manifest = verify_bundle(args.bundle, public_key=args.key, require_signature=args.require_signature)
    total = sum(entry["size"] for entry in manifest["files"].values())
    if args.key is not None:
        signature = f"signature verified with {args.key} ({_fingerprint(load_public_key(args.key))})"
    elif args.bundle.is_dir() and (args.bundle / SIGNATURE).exists():
        signature = "signed, signature not checked (pass --key)"
    else:
        signature = "signature not checked (pass --key)" if not args.bundle.is_dir() else "not signed"
    kind = bundle_kind(manifest)
    if kind == KIND_BASE_PACK:
        what = f"base pack {manifest['content_sha256']} ({describe(reference(manifest))})"
    elif kind == KIND_SUBJECT:
        what = f"subject bundle for base pack {manifest['base_pack']['content_sha256']}"
    else:
        what = "single bundle (weights inside)"
    print(f"OK {args.bundle}: {len(manifest['files'])} files, {total} bytes ({_human(total)}); {signature}; {what}")
    return 0

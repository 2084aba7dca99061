"""`blockskip deploy`: copy a bundle (and optionally the agent config) to a board over SSH.

The copy goes through rsync into a staging directory `DEST.incoming` next to the destination, so
an interrupted copy resumes where it stopped (`--partial-dir`) and a bad copy never replaces a
good bundle. After the copy the staging directory is checked *on the board* against the local
manifest with `sha256sum -c` (blockskip need not be installed on the board's PATH), then renamed
into place. A bundle that a running job uses is never replaced: the job holds a lock file
`DEST.inuse` (JSON `{"pid": int, "job": str, "since": iso}`) while it runs; a lock whose pid is
alive on the board refuses the deploy, a stale one is reported and ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import posixpath
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from blockskip.errors import BundleError, InputError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
STAGING_SUFFIX = ".incoming"
PREVIOUS_SUFFIX = ".previous"
LOCK_SUFFIX = ".inuse"
PARTIAL_DIR = ".rsync-partial"
DEFAULT_CONFIG_DEST = "/etc/blockskip/agent.yaml"
# Exit status the lock probe uses for "no lock file"; ssh itself uses 255 for its own failures.
_NO_LOCK = 3
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._+@=,-][A-Za-z0-9._+@=,/ -]*$")


@dataclass
class Remote:
    """How to reach the board: `ssh [-p port] [-i identity] [-o option ...] host`."""

    host: str  # "board" or "user@board"
    port: int | None = None  # ssh port; None = ssh's default / ~/.ssh/config
    identity: str | None = None  # private key file; None = ssh's defaults / agent
    options: list[str] = field(default_factory=list)  # extra "Key=Value" ssh options

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity is not None:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        for option in self.options:
            argv += ["-o", option]
        return argv

    def run(self, script: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run a POSIX sh script on the board; ssh failures (exit 255) raise InputError."""
        argv = self.ssh_argv() + [self.host, "--", "sh", "-c", shlex.quote(script)]
        logger.debug("ssh: %s", script)
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
        if proc.returncode == 255:
            raise InputError(f"cannot reach {self.host} over ssh: {proc.stderr.strip()}; check the host, "
                             "--port, --identity and that the key is in the board's authorized_keys")
        return proc


def parse_target(target: str) -> tuple[str, str]:
    """Split "HOST:DEST" (HOST may be "user@host"); DEST is the bundle directory on the board."""
    host, sep, dest = target.partition(":")
    if not sep or not host or not dest:
        raise InputError(f"target {target!r} is not HOST:DEST (e.g. jetson@orin.local:/var/lib/blockskip/bundles/maize)")
    dest = posixpath.normpath(dest)
    if dest in ("/", ".", "..") or dest.endswith("/.."):
        raise InputError(f"destination {dest!r} must name the bundle directory on the board, not {dest!r}")
    return host, dest


def read_manifest(bundle: Path) -> tuple[bytes, dict[str, dict]]:
    """Read and check the local manifest: every listed file exists with its size; paths are safe."""
    if not bundle.is_dir():
        raise InputError(f"bundle {bundle} is not a directory; pass the bundle directory `blockskip bundle` wrote")
    path = bundle / MANIFEST
    try:
        raw = path.read_bytes()
        files = json.loads(raw)["files"]
    except FileNotFoundError as err:
        raise BundleError(f"{bundle} has no {MANIFEST}; is it a bundle directory?") from err
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path} is not a bundle manifest (needs a `files` table): {err}") from err
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: `files` must map relative paths to {{sha256, size}}")
    for rel, entry in files.items():
        parts = rel.split("/")
        if not _SAFE_PATH.match(rel) or ".." in parts or "" in parts or rel in (MANIFEST, SIGNATURE):
            raise BundleError(f"{path}: unsafe or reserved file path {rel!r} in the manifest")
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise BundleError(f"{path}: entry {rel!r} needs a lowercase hex sha256")
        local = bundle / rel
        if not local.is_file():
            raise BundleError(f"bundle file {rel} listed in the manifest is missing from {bundle}")
        if local.stat().st_size != entry.get("size"):
            raise BundleError(f"bundle file {rel} is {local.stat().st_size} bytes, the manifest says "
                              f"{entry.get('size')}; the local bundle is corrupt, rebuild or re-copy it")
    return raw, files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_lock(remote: Remote, dest: str) -> None:
    """Refuse if `DEST.inuse` names a pid alive on the board; warn and go on if it is stale."""
    lock = dest + LOCK_SUFFIX
    q = shlex.quote(lock)
    proc = remote.run(f"if [ -e {q} ]; then cat {q}; else exit {_NO_LOCK}; fi")
    if proc.returncode == _NO_LOCK:
        return
    if proc.returncode != 0:
        raise InputError(f"cannot read the lock file {lock} on {remote.host}: {proc.stderr.strip()}")
    try:
        info = json.loads(proc.stdout)
        pid = int(info["pid"])
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"lock file {lock} on {remote.host} is not JSON with a pid ({err}); a job may be "
                          f"using {dest}: if none is, remove the lock file and rerun") from err
    if pid <= 0:
        raise BundleError(f"lock file {lock} on {remote.host} has an invalid pid {pid}; remove it if no job runs")
    alive = remote.run(f"kill -0 {pid} 2>/dev/null || [ -d /proc/{pid} ]").returncode == 0
    job, since = info.get("job", "?"), info.get("since", "?")
    if alive:
        raise BundleError(f"refusing to overwrite {remote.host}:{dest}: job {job!r} (pid {pid}, since {since}) "
                          f"is using it (lock {lock}); wait for it to finish or stop it, then rerun")
    logger.warning("stale lock %s on %s (job %r, pid %d is not running); overwriting", lock, remote.host, job, pid)


def rsync(remote: Remote, source: str, dest: str, extra: list[str]) -> int:
    """rsync SOURCE to HOST:DEST over the same ssh; return the literal (newly sent) file bytes."""
    argv = ["rsync", "-a", "--no-owner", "--no-group", "--copy-links", "--delete", "--partial",
            f"--partial-dir={PARTIAL_DIR}", "--stats", "-e", shlex.join(remote.ssh_argv()), *extra,
            source, f"{remote.host}:{dest}"]
    if sys.stderr.isatty():
        argv.insert(1, "--info=progress2")
    logger.debug("rsync: %s", shlex.join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()
    assert proc.stdout is not None, "stdout is piped"
    while chunk := proc.stdout.read1(65536):
        out += chunk
        if sys.stderr.isatty():
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise BundleError(f"copy to {remote.host}:{dest} stopped (rsync exit {proc.returncode}: {err.strip()}); "
                          "rerun the same command to resume where it stopped")
    match = re.search(r"Literal data: ([\d,.]+)", out.decode(errors="replace"))
    return int(match.group(1).replace(",", "").replace(".", "")) if match else 0


def verify_remote(remote: Remote, staging: str, bundle: Path, files: dict[str, dict], manifest: bytes) -> None:
    """Check on the board that STAGING holds exactly the manifest's files with the manifest's hashes."""
    expected = [(entry["sha256"], rel) for rel, entry in files.items()]
    expected.append((hashlib.sha256(manifest).hexdigest(), MANIFEST))
    if (bundle / SIGNATURE).is_file():
        expected.append((sha256_file(bundle / SIGNATURE), SIGNATURE))
    listing = "".join(f"{digest}  {rel}\n" for digest, rel in expected)
    q = shlex.quote(staging)
    proc = remote.run(f"command -v sha256sum >/dev/null || {{ echo 'no sha256sum on the board' >&2; exit 4; }}; "
                      f"cd {q} && sha256sum -c --strict -", stdin=listing)
    if proc.returncode == 4:
        raise InputError(f"{remote.host} has no sha256sum; install coreutils (or busybox) on the board")
    failed = [line.rsplit(":", 1)[0] for line in proc.stdout.splitlines() if re.search(r": FAILED", line)]
    if proc.returncode != 0 or failed:
        first = failed[0] if failed else None
        detail = f": {proc.stderr.strip()}" if not first else ""
        if first and first in files and sha256_file(bundle / first) != files[first]["sha256"]:
            raise BundleError(f"bundle file {first} in {bundle} does not match its manifest (the local bundle is "
                              f"corrupt; rebuild or re-copy it); nothing was replaced on {remote.host}")
        raise BundleError(f"verification on {remote.host} failed for {first or 'the bundle'}{detail}: the copy in "
                          f"{staging} does not match the manifest; nothing was replaced. Rerun with --checksum "
                          "to re-send every file whose content differs")
    proc = remote.run(f"cd {q} && find . \\( -type f -o -type l \\) -print")
    present = {line[2:] for line in proc.stdout.splitlines() if line.startswith("./")}
    extra = sorted(present - {rel for _, rel in expected})
    if proc.returncode != 0 or extra:
        raise BundleError(f"{staging} on {remote.host} holds files that are not in the manifest "
                          f"({', '.join(extra[:5]) or proc.stderr.strip()}); nothing was replaced")


def swap_into_place(remote: Remote, staging: str, dest: str, keep_previous: bool) -> None:
    """rename(2) STAGING -> DEST; an existing DEST moves to DEST.previous first (then is removed)."""
    s, d, p = (shlex.quote(x) for x in (staging, dest, dest + PREVIOUS_SUFFIX))
    script = (f"set -e; rm -rf {p}; "
              f"if [ -e {d} ]; then mv -T {d} {p}; mv -T {s} {d} || {{ mv -T {p} {d}; exit 1; }}; "
              f"else mv -T {s} {d}; fi")
    if not keep_previous:
        script += f"; rm -rf {p}"
    proc = remote.run(script)
    if proc.returncode != 0:
        raise BundleError(f"could not move {staging} into place at {dest} on {remote.host}: {proc.stderr.strip()}")


def copy_config(remote: Remote, config: Path, dest: str) -> None:
    """Copy the agent config next to nothing else: rsync writes a temp file and renames it."""
    if not config.is_file():
        raise InputError(f"agent config {config} does not exist")
    proc = remote.run(f"mkdir -p {shlex.quote(posixpath.dirname(dest) or '.')}")
    if proc.returncode != 0:
        raise InputError(f"cannot create the config directory for {dest} on {remote.host}: {proc.stderr.strip()}")
    rsync(remote, str(config), dest, [])
    digest = sha256_file(config)
    proc = remote.run("sha256sum -c --strict --quiet -", stdin=f"{digest}  {dest}\n")
    if proc.returncode != 0:
        raise BundleError(f"agent config {dest} on {remote.host} does not match {config} after the copy")


def run(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    host, dest = parse_target(args.target)
    remote = Remote(host, args.port, args.identity, list(args.ssh_option))
    manifest, files = read_manifest(bundle)
    total = sum(int(entry["size"]) for entry in files.values())
    staging = dest + STAGING_SUFFIX

    check_lock(remote, dest)
    proc = remote.run(f"command -v rsync >/dev/null || {{ echo 'rsync is not installed' >&2; exit 4; }}; "
                      f"mkdir -p {shlex.quote(staging)}")
    if proc.returncode != 0:
        raise InputError(f"cannot prepare {staging} on {host}: {proc.stderr.strip()} (install rsync on the board "
                         "and check that the ssh user can write the destination's parent directory)")
    extra = ["--checksum"] if args.checksum else []
    if args.bwlimit:
        extra.append(f"--bwlimit={args.bwlimit}")
    # Unchanged files are hard-linked from the live bundle instead of sent again (relative to staging).
    extra.append(f"--link-dest=../{posixpath.basename(dest)}")
    sent = rsync(remote, f"{bundle}/", staging + "/", extra)
    print(f"copied {sent:,} new bytes; {max(total - sent, 0):,} of {total:,} bundle bytes were already on {host}")

    verify_remote(remote, staging, bundle, files, manifest)
    check_lock(remote, dest)  # a job may have started during the copy
    swap_into_place(remote, staging, dest, args.keep_previous)
    print(f"verified {len(files)} files on {host} and installed the bundle at {dest}")

    if args.config:
        copy_config(remote, Path(args.config), args.config_dest)
        print(f"installed agent config at {host}:{args.config_dest}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="copy a bundle (and the agent config) to a board over SSH and verify it there",
        description=(
            "Copy BUNDLE to HOST:DEST over SSH with rsync, verify every file's sha256 on the board against "
            "the local manifest, then move it into place. The copy goes to DEST.incoming first: rerunning "
            "after an interruption resumes it, and a copy that fails verification never replaces the bundle "
            "at DEST. Refuses while a running job holds DEST.inuse (JSON with its pid); a stale lock is "
            "reported and ignored. Needs ssh and rsync here, and rsync and sha256sum on the board. BUNDLE is a "
            "subject bundle, or a base pack (the kept weights: once per board, model and plan, into the agent's "
            "base_packs_dir, e.g. orin:/var/lib/blockskip/base-packs/flux-50). See deploy/README.md."),
    )
    p.add_argument("bundle", metavar="BUNDLE",
                   help="local bundle or base pack directory (with manifest.json); unpack a tar first")
    p.add_argument("target", metavar="HOST:DEST",
                   help="ssh host (user@host or a ~/.ssh/config alias) and the bundle directory on the board, "
                        "e.g. orin:/var/lib/blockskip/bundles/maize")
    p.add_argument("--config", metavar="AGENT_YAML", help="also copy this agent config to the board")
    p.add_argument("--config-dest", default=DEFAULT_CONFIG_DEST, metavar="PATH",
                   help=f"where --config goes on the board (default: {DEFAULT_CONFIG_DEST}, the path the systemd unit "
                        "and the Jetson container read)")
    p.add_argument("--port", "-p", type=int, help="ssh port on the board (default: ssh's, usually 22)")
    p.add_argument("--identity", "-i", metavar="KEY", help="ssh private key file (default: ssh's keys or agent)")
    p.add_argument("--ssh-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ssh option, repeatable (e.g. -o ConnectTimeout=10)")
    p.add_argument("--bwlimit", type=int, metavar="KBPS", help="limit the copy to KBPS KiB/s (slow field links)")
    p.add_argument("--checksum", action="store_true",
                   help="compare files by content rather than size and time (after a failed verification)")
    p.add_argument("--keep-previous", action="store_true",
                   help="keep the replaced bundle at DEST.previous (costs its disk space on the board)")
    p.set_defaults(func=run)

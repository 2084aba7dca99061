#!/usr/bin/env python3
"""Which torch wheel a board would get, and whether it is a CUDA build there.

    python3 deploy/pi/torch_wheel.py [--machine aarch64] [--index-url URL] SPEC

Asks pip (a dry run: nothing is installed) which wheel SPEC resolves to for MACHINE (default: this
machine), reads that wheel's own metadata from pip's JSON report and evaluates its requirements'
markers for MACHINE on Linux. Exit 0 and one line naming the wheel when no CUDA package applies;
exit 1 naming them when one does (from torch 2.11 on, PyPI's aarch64 wheels are CUDA 13 builds whose
nvidia-* requirements apply on aarch64 too: 4.6 GB on a Pi's SD card). deploy/pi/install.sh runs it
before installing torch; tests/deploy/test_pi.py runs it for aarch64 with the spec install.sh picks.
Standard library and pip only (pip's vendored `packaging` where `packaging` is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv: pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")
# manylinux tags pip may pick for each machine when asked for another one than this
PLATFORMS = {"aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
             "x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]}


def resolve(spec: str, machine: str, index_url: str | None, python_version: str) -> dict:
    """pip's report entry of the wheel `spec` resolves to for `machine` (no dependencies)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        # --ignore-installed: a re-run (torch already in the venv) still reports the wheel
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
               "--only-binary=:all:", "--report", str(report)]
        if machine != platform.machine():
            cmd += [arg for tag in PLATFORMS[machine] for arg in ("--platform", tag)]
            cmd += ["--python-version", python_version, "--target", str(Path(tmp) / "target")]
        if index_url:
            cmd += ["--index-url", index_url]
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(cmd + [spec], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"error: pip found no {machine} wheel for {spec!r}"
                             f"{' on ' + index_url if index_url else ''}:\n{proc.stderr.strip()[-2000:]}")
        entries = json.loads(report.read_text())["install"]
    if not entries:
        raise SystemExit(f"error: pip's report names no wheel for {spec!r}")
    return entries[0]


def cuda_requirements(metadata: dict, machine: str, python_version: str) -> list[str]:
    env = {**default_environment(), "platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
           "os_name": "posix", "python_version": python_version, "python_full_version": f"{python_version}.0"}
    found = []
    for line in metadata.get("requires_dist", []):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({**env, "extra": ""}):
            continue
        if requirement.name.lower().startswith(CUDA_PREFIXES):
            found.append(str(requirement.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="what pip would install, e.g. torch==2.10.0")
    parser.add_argument("--machine", default=platform.machine(), choices=sorted(PLATFORMS),
                        help="the board's machine (default: this one)")
    parser.add_argument("--index-url", help="the index to ask (default: pip's)")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the board's Python (default: this one; bookworm's is 3.11)")
    args = parser.parse_args()
    entry = resolve(args.spec, args.machine, args.index_url, args.python_version)
    wheel = entry["download_info"]["url"].rsplit("/", 1)[-1]
    cuda = cuda_requirements(entry["metadata"], args.machine, args.python_version)
    if cuda:
        print(f"error: {args.spec} resolves to {wheel}, a CUDA build on {args.machine}: it requires "
              f"{', '.join(cuda)}. On a CPU board use TORCH_SPEC=torch==2.10.0 (the newest CPU-only aarch64 wheel "
              f"on PyPI) or a CPU wheel index (TORCH_INDEX).", file=sys.stderr)
        return 1
    print(f"{args.spec} -> {wheel}: a CPU build on {args.machine} (no CUDA packages required)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

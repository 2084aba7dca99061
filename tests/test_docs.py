"""The documentation a clone holds is complete: no links out of the repository, none broken."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "blockskip-demo"}
# [text](target) or [text](target "title"); reference definitions `[label]: target`
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
# written in pieces so that this file does not match itself
OUTSIDE = ["../" + "shared", "/work/" + "shared"]


def repository_files() -> list[Path]:
    """Tracked files (a git checkout), else every file outside build and tool folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def markdown_links(text: str) -> list[str]:
    """Link targets outside fenced code blocks."""
    prose = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def test_nothing_links_or_refers_outside_the_repository():
    offenders = []
    for path in repository_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # weights and images
        offenders += [f"{path.relative_to(ROOT)}: {needle}" for needle in OUTSIDE if needle in text]
    assert not offenders, "files point outside the repository (a clone cannot read it): " + ", ".join(offenders)


def test_every_relative_markdown_link_resolves_inside_the_repository():
    broken = []
    documents = [p for p in repository_files() if p.suffix == ".md"]
    assert ROOT / "DESIGN.md" in documents and ROOT / "README.md" in documents
    for document in documents:
        for target in markdown_links(document.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # http(s)://, mailto:, an anchor in the same page
            resolved = (document.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{document.relative_to(ROOT)}: ({target})")
    assert not broken, "broken or outside links: " + ", ".join(broken)


def test_readme_links_the_design_doc():
    assert "(DESIGN.md)" in (ROOT / "README.md").read_text()

import subprocess
import sys

import pytest

from blockskip import cli

HEAVY = ("torch", "diffusers", "peft", "onnxruntime", "transformers")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m blockskip ARGS`; return the process and every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "blockskip", *args],
                          capture_output=True, text=True)
    names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, names


def test_help_lists_commands():
    out = subprocess.run(["blockskip", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "profile", "plan", "cache", "bundle", "verify", "train", "generate", "agent"):
        assert command in out


def test_module_entry_point_matches_console_script():
    out = subprocess.run([sys.executable, "-m", "blockskip", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("blockskip ")


def test_static_command_table_matches_the_modules():
    """The fast top-level help (static table) says exactly what the modules' own register() says."""
    static = cli.build_parser().format_help()
    loaded = cli.build_parser(load=[name for name, _, _ in cli.COMMANDS]).format_help()
    assert static == loaded


@pytest.mark.parametrize("args, rc, stream, text", [
    (["--help"], 0, "stdout", "generate"),
    (["--version"], 0, "stdout", "blockskip "),
    (["demoo"], 2, "stderr", "invalid choice: 'demoo'"),
    ([], 2, "stdout", "COMMAND"),
])
def test_fast_paths_do_not_import_torch(args, rc, stream, text):
    proc, modules = imported_modules(*args)
    assert proc.returncode == rc and text in getattr(proc, stream)
    assert "blockskip.cli" in modules, "importtime saw the CLI start"
    assert not modules & set(HEAVY), f"`blockskip {' '.join(args)}` imported {sorted(modules & set(HEAVY))}"


@pytest.mark.slow
def test_command_help_is_complete():
    proc, modules = imported_modules("train", "--help")
    assert proc.returncode == 0
    for option in ("--steps", "--resume", "--key", "--track-memory"):
        assert option in proc.stdout
    assert "torch" in modules, "a command's own help comes from its module"

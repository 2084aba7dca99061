import subprocess
import sys


def test_help_lists_commands():
    out = subprocess.run(["blockskip", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "profile", "plan", "cache", "bundle", "verify", "train", "generate", "agent"):
        assert command in out


def test_module_entry_point_matches_console_script():
    out = subprocess.run([sys.executable, "-m", "blockskip", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("blockskip ")

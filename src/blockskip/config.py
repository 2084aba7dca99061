"""Reading a YAML configuration file (agent.yaml, host.yaml, operator.yaml, camera.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockskip.errors import ConfigError


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping or raise ConfigError."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    return data

"""Model families over the real diffusers transformer classes, and the skip-plan forward."""

from __future__ import annotations

from blockskip.errors import ConfigError
from blockskip.models.family import Family
from blockskip.models.flux import Flux
from blockskip.models.sana import Sana

FAMILIES: dict[str, type[Family]] = {Flux.name: Flux, Sana.name: Sana}


def family_class(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


__all__ = ["FAMILIES", "Family", "Flux", "Sana", "family_class"]

"""Plans that fit a board: `blockskip plan --board NAME` / `--memory-budget GiB`.

The choice walks the settings from the most faithful to the lightest and takes the first whose
estimated training peak (the plan's tensor estimate plus the runtime) fits the budget:

    training resolution: the default s_min, then 3/4 and 1/2 of it
      skip ratio: 30%, then 50% (the paper's two settings; fidelity falls with the blocks skipped)
        kept weights: as they are, then int8, then NF4 (QLoRA keeps 16-bit LoRA's quality,
                      Dettmers et al. 2023; here: benchmarks/results/train_memory_quant.md)

so a smaller board first quantizes, then skips more, and lowers the resolution last. A setting the
user gave (`--skip-ratio` / `--skip-blocks`, `--quant`, `--s-min`) is held fixed; when no plan
with it fits, the command refuses with one line that names the lightest plan that would.
Generation is checked too: which backend and weight precision the board can generate with, at
the generation size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from blockskip.boards import RUNTIME_BYTES, Budget, generation_options, gib
from blockskip.errors import ConfigError
from blockskip.plan import PlanDocument

RATIOS = (0.3, 0.5)
QUANTS = ("none", "int8", "nf4")


@dataclass
class Candidate:
    ratio: float | None  # None: an explicit --skip-blocks
    quant: str
    s_min: int
    plan: PlanDocument

    @property
    def need(self) -> int:
        return self.plan.estimates["train_memory_bytes"] + RUNTIME_BYTES

    def flags(self) -> str:
        skip = (f"--skip-ratio {self.ratio:g}" if self.ratio is not None
                else f"--skip-blocks {self.plan.skip.num_blocks - len(self.plan.kept)}")
        return f"{skip} --quant {self.quant} --s-min {self.s_min}"


def resolutions(s_min: int, granularity: int) -> list[int]:
    """The default training side, then 3/4 and 1/2 of it, on the model's grid."""
    sizes = []
    for fraction in (1.0, 0.75, 0.5):
        size = max(granularity, int(s_min * fraction) // granularity * granularity)
        if size not in sizes:
            sizes.append(size)
    return sizes


def choose(make: Callable[[float | None, str, int], dict], budget: Budget, s_min: int, granularity: int,
           ratio: float | None = None, blocks_given: bool = False, quant: str | None = None,
           s_min_given: bool = False) -> tuple[Candidate, list[Candidate]]:
    """The first candidate (most faithful first) that fits, and every one tried. `make(ratio,
    quant, s_min)` builds a plan document (ratio None: the explicit --skip-blocks). Settings given
    by the user are held fixed; raises ConfigError naming the lightest fitting plan otherwise."""
    plans: dict[tuple, PlanDocument] = {}

    def plan_for(r: float | None, q: str, size: int) -> PlanDocument:  # each setting is planned once
        if (r, q, size) not in plans:
            plans[(r, q, size)] = make(r, q, size)
        return plans[(r, q, size)]

    fixed = ratio is not None or blocks_given
    sizes = [s_min] if s_min_given else resolutions(s_min, granularity)
    ratios = [ratio] if fixed else list(RATIOS)
    quants = [quant] if quant else list(QUANTS)
    tried = []
    for size in sizes:
        for r in ratios:
            for q in quants:
                candidate = Candidate(r, q, size, plan_for(r, q, size))
                tried.append(candidate)
                if candidate.need <= budget.bytes:
                    return candidate, tried
    lightest = min(tried, key=lambda c: c.need)
    given = [flag for flag, on in (("the skip budget", fixed), ("--quant", bool(quant)), ("--s-min", s_min_given))
             if on]
    hint = ""
    if given:  # what would fit if the user's settings were free
        free = [Candidate(r, q, size, plan_for(r, q, size)) for size in resolutions(s_min, granularity)
                for r in RATIOS for q in QUANTS]
        fitting = [c for c in free if c.need <= budget.bytes]
        hint = (f"; {fitting[0].flags()} would fit (est. {gib(fitting[0].need)})" if fitting
                else "; no plan of 30-50% skipped, any quantization and down to half the resolution fits")
    raise ConfigError(f"no plan with {' and '.join(given) or 'these settings'} fits {budget.source}: the lightest, "
                      f"{lightest.flags()}, needs about {gib(lightest.need)}{hint}")


def generation_summary(model, budget: Budget, size: int, text_len: int) -> tuple[dict | None, str]:
    """The first (heaviest, so most faithful) generation option of the board that fits, and a
    one-line account of it."""
    if budget.board is None:
        return None, ""
    options = generation_options(model, budget.board, size, size, text_len)
    for option in options:
        if option["peak_bytes"] <= budget.bytes:
            return option, (f"generation at {size}x{size} fits: {option['backend']} with {option['precision']} "
                            f"weights, est. {gib(option['peak_bytes'])}")
    lightest = options[-1]
    return None, (f"generation at {size}x{size} does not fit: even {lightest['backend']} with "
                  f"{lightest['precision']} weights needs about {gib(lightest['peak_bytes'])}")

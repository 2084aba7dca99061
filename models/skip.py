"""Skip plans and the cached-feature forward (the repository's DESIGN.md, "The method", step 3).

A plan names the skipped blocks as half-open spans. From the first kept block on, the forward
alternates: run a run of kept blocks, then add the cached residual `f_{i+l} - f_i` of the
skipped span that follows. Blocks before the first kept one are replaced by the cached entry
state, which is exact because nothing before it is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from blockskip.errors import ConfigError
from blockskip.models.family import Cond, Family, State

Span = tuple[int, int]


@dataclass(frozen=True)
class SkipPlan:
    num_blocks: int  # blocks in the full model (FLUX: double + single)
    skipped: tuple[Span, ...]  # half-open [start, end) spans, sorted, disjoint, not touching

    def __post_init__(self):
        if self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        spans = tuple((int(a), int(b)) for a, b in self.skipped)
        object.__setattr__(self, "skipped", spans)
        previous_end = -1
        for start, end in spans:
            if not 0 <= start < end <= self.num_blocks:
                raise ConfigError(f"skipped span [{start}, {end}) is empty or outside [0, {self.num_blocks})")
            if start <= previous_end:
                raise ConfigError(f"skipped spans must be sorted, disjoint and merged; got {list(spans)}")
            previous_end = end
        if not self.kept:
            raise ConfigError("a plan must keep at least one block")

    @classmethod
    def first_last(cls, num_blocks: int, n: int, m: int) -> "SkipPlan":
        """Skip the first n and the last m blocks (the paper's plan shape)."""
        if n < 0 or m < 0:
            raise ConfigError(f"n and m must be >= 0, got n={n}, m={m}")
        if n + m >= num_blocks:
            raise ConfigError(f"cannot skip {n} + {m} of {num_blocks} blocks: at least one must be kept")
        return cls.from_blocks(num_blocks, [*range(n), *range(num_blocks - m, num_blocks)])

    @classmethod
    def from_blocks(cls, num_blocks: int, skipped_blocks) -> "SkipPlan":
        """A plan from any set of skipped block indices (merged into spans)."""
        spans: list[list[int]] = []
        for index in sorted(set(int(i) for i in skipped_blocks)):
            if spans and spans[-1][1] == index:
                spans[-1][1] = index + 1
            else:
                spans.append([index, index + 1])
        return cls(num_blocks, tuple((a, b) for a, b in spans))

    @property
    def skipped_blocks(self) -> list[int]:
        return [i for a, b in self.skipped for i in range(a, b)]

    @property
    def kept(self) -> list[int]:
        skipped = set(self.skipped_blocks)
        return [i for i in range(self.num_blocks) if i not in skipped]

    @property
    def first_kept(self) -> int:
        return self.kept[0]

    def segments(self) -> Iterator[tuple[str, int, int]]:
        """("run", a, b) and ("skip", a, b) pieces from the first kept block to the end."""
        cursor = self.first_kept
        for start, end in self.skipped:
            if end <= cursor:
                continue
            if start > cursor:
                yield ("run", cursor, start)
            yield ("skip", start, end)
            cursor = end
        if cursor < self.num_blocks:
            yield ("run", cursor, self.num_blocks)

    @property
    def residual_spans(self) -> list[Span]:
        """Skipped spans after the first kept block: each needs a cached residual."""
        return [(a, b) for kind, a, b in self.segments() if kind == "skip"]

    def to_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "skipped": [list(s) for s in self.skipped],
                "kept": self.kept}

    @classmethod
    def from_dict(cls, data: dict) -> "SkipPlan":
        return cls(int(data["num_blocks"]), tuple(tuple(s) for s in data["skipped"]))


def residual_keys(family: Family, plan: SkipPlan, span: Span, state_keys) -> list[str]:
    """State entries a span's residual must carry: only image tokens for the final span,
    since after it only the head reads the state (and the head reads image tokens only)."""
    if span[1] == plan.num_blocks:
        return [family.image_key]
    return list(state_keys)


@torch.no_grad()
def compute_features(family: Family, plan: SkipPlan, inputs: dict):
    """Run the frozen full model once and return what the kept blocks need.

    Returns (entry_state, residuals, cond, output): the state entering the first kept block,
    {span: residual state} for every later skipped span, the conditioning, and the full
    model's output (for checks).
    """
    state, cond = family.embed(**inputs)
    state = family.run_blocks(state, cond, 0, plan.first_kept)
    entry_state = dict(state)
    residuals: dict[Span, State] = {}
    for kind, start, end in plan.segments():
        after = family.run_blocks(state, cond, start, end)
        if kind == "skip":
            keys = residual_keys(family, plan, (start, end), after)
            residuals[(start, end)] = {k: after[k] - state[k] for k in keys}
        state = after
    return entry_state, residuals, cond, family.head(state, cond)


def reduced_forward(family: Family, plan: SkipPlan, entry_state: State,
                    residuals: dict[Span, State], cond: Cond, checkpointing: bool = False) -> torch.Tensor:
    """Kept blocks only: entry state -> kept run -> + span residual -> kept run -> ... -> head.
    With `checkpointing`, each kept block's activations are recomputed in backward."""
    state = dict(entry_state)
    for kind, start, end in plan.segments():
        if kind == "run":
            state = family.run_blocks(state, cond, start, end, checkpointing=checkpointing)
        else:
            residual = residuals[(start, end)]
            state = {k: (v + residual[k] if k in residual else v) for k, v in state.items()}
    return family.head(state, cond)

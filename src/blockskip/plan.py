"""The plan document: what `blockskip plan` writes and `cache`, `prepare`, the worker and the demo
read (the repository's DESIGN.md, "Contracts", "Plan").

A plan is a typed, versioned JSON file:

    {"kind": "blockskip-plan", "version": 1,
     "model": {...},                       # the model it was made for (family, config_hash, ...)
     "plan": {"num_blocks", "skipped", "kept", + how the split was chosen: n, m, score, why, ...},
     "patch_schedule": {"s_min", "s_max", "granularity", "schedule", "t_max"},
     "lora": {"rank", "alpha", "scope", "target_modules"},
     "samples": int, "feature_dtype": str, "quant": str,
     "estimates": {"train_memory_bytes", "cache_bytes", ...},
     "board": {...}}                       # only when `plan --board/--memory-budget` chose it

`PlanDocument.load` checks every field and names the one that is wrong; a plan written before the
version field existed (same layout, no "version") is read as version 1. The patch schedule and the
LoRA settings live here because they are part of this contract (host/patches.py samples with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from blockskip.errors import ConfigError, InputError
from blockskip.features import FEATURE_DTYPES
from blockskip.files import write_atomic
from blockskip.models.skip import SkipPlan
from blockskip.quant import QUANT_SCHEMES

PLAN_KIND = "blockskip-plan"
PLAN_VERSION = 1
# Estimates every consumer reads (plan's printout, --board's fit, the demo report, the worker).
ESTIMATE_FIELDS = ("train_memory_bytes", "cache_bytes", "cache_bytes_per_draw", "bank_bytes_per_prompt",
                   "base_pack_bytes")

SCHEDULES = ("low-to-high", "high-to-low", "random", "resize")
# Downsizing filter: every crop is at least s_min, so resizing to s_min only ever shrinks.
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class PatchSchedule:
    s_min: int = 256  # training resolution: every patch is resized to s_min x s_min (FLUX paper: 256)
    s_max: int = 512  # crop side at the far end of the schedule (FLUX paper: 512; SANA: 1024 -> 512)
    granularity: int = 16  # crop sides are multiples of this (VAE factor x patch size; FLUX 8 x 2)
    schedule: str = "low-to-high"  # one of SCHEDULES; see the module docstring
    t_max: float = 1.0  # T: the largest timestep (1.0 for a flow-matching sigma, 1000 for DDPM steps)

    def __post_init__(self):
        for name in ("s_min", "s_max", "granularity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.s_min % self.granularity:
            raise ConfigError(f"s_min must be a multiple of granularity {self.granularity}, got {self.s_min}")
        if self.s_max % self.granularity:
            raise ConfigError(f"s_max must be a multiple of granularity {self.granularity}, got {self.s_max}")
        if self.s_min > self.s_max:
            raise ConfigError(f"s_min must be <= s_max, got s_min={self.s_min}, s_max={self.s_max}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not (isinstance(self.t_max, (int, float)) and math.isfinite(self.t_max) and self.t_max > 0):
            raise ConfigError(f"t_max must be a positive finite number, got {self.t_max!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchSchedule":
        unknown = set(data) - {"s_min", "s_max", "granularity", "schedule", "t_max"}
        if unknown:
            raise ConfigError(f"unknown patch schedule field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def _round(self, side: float) -> int:
        """Nearest multiple of the granularity (halves round up, independent of float parity)."""
        g = self.granularity
        return int(math.floor(side / g + 0.5)) * g

    def crop_side(self, t: float, rng: np.random.Generator | None = None) -> int | None:
        """The crop side for timestep t before clamping to an image; None for `resize` (whole image).

        `rng` is only drawn from by the `random` schedule.
        """
        if not (math.isfinite(t) and 0.0 <= t <= self.t_max):
            raise ConfigError(f"timestep t must be in [0, {self.t_max}], got {t}")
        frac = t / self.t_max
        span = self.s_max - self.s_min
        if self.schedule == "low-to-high":
            side = self._round(self.s_min + frac * span)
        elif self.schedule == "high-to-low":
            side = self._round(self.s_max - frac * span)
        elif self.schedule == "random":
            if rng is None:
                raise ConfigError("the random schedule needs an rng")
            g = self.granularity
            side = int(rng.integers(self.s_min // g, self.s_max // g + 1)) * g
        else:  # resize
            return None
        assert self.s_min <= side <= self.s_max, f"crop side {side} outside [{self.s_min}, {self.s_max}]"
        return side

    def sample_patch(self, image: Image.Image, t: float, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One training patch: an RGB s_min x s_min image and where it came from.

        info: {"side": crop side in source pixels, "left": x of the crop, "top": y of the crop}.
        Draw order from rng (for reproducibility): crop side (random schedule only), left, top.
        """
        if image.mode != "RGB":
            raise InputError(f"sample_patch needs an RGB image (use load_image), got mode {image.mode}")
        width, height = image.size
        short = min(width, height)
        if short < self.s_min:
            source = image.info.get("source", "image")
            raise InputError(f"{source}: {width}x{height} is smaller than the training resolution: its shorter "
                             f"side {short} must be at least s_min={self.s_min}")
        side = self.crop_side(t, rng)
        if side is None:  # resize: the largest centered square, nothing distorted
            side = short
            left, top = (width - side) // 2, (height - side) // 2
        else:
            side = min(side, short // self.granularity * self.granularity)
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
        # Crop, then resize: resize(box=...) would let the filter read pixels outside the crop.
        patch = image.crop((left, top, left + side, top + side))
        if side != self.s_min:
            patch = patch.resize((self.s_min, self.s_min), RESAMPLE)
        return patch, {"side": side, "left": left, "top": top}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha (scale = alpha / r)
    scope: str = "attention"  # "attention": attention projections; "all": also the MLPs

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if self.scope not in ("attention", "all"):
            raise ConfigError(f"lora scope must be 'attention' or 'all', got {self.scope!r}")

    @classmethod
    def for_model(cls, model) -> tuple["LoraSettings", str]:
        """(settings, where they come from): what the model folder records (blockskip.json "lora";
        the built-in crop model: rank 8 on attention and MLPs, the settings its quality table was
        measured with), else the defaults above. `plan`, the host worker and the demo all start here."""
        recorded = (getattr(model, "meta", None) or {}).get("lora")
        if not recorded:
            return cls(), "blockskip's defaults"
        try:
            return cls(**recorded), "the model's blockskip.json"
        except (TypeError, ConfigError) as err:
            raise InputError(f"the model's blockskip.json has a 'lora' entry blockskip cannot use ({recorded!r}): "
                             f"{err}") from err


@dataclass(frozen=True)
class PlanDocument:
    model: dict  # model.describe() of the model the plan was made for (family, config_hash, ...)
    skip: SkipPlan
    schedule: PatchSchedule
    lora: LoraSettings
    target_modules: tuple[str, ...]  # the kept blocks' LoRA targets (peft names)
    samples: int  # unique training draws the cache stores
    feature_dtype: str  # how the cache stores the features (one of blockskip.features.FEATURE_DTYPES)
    quant: str  # how the base pack stores the kept Linear weights (one of blockskip.quant.QUANT_SCHEMES)
    estimates: dict  # memory and size estimates (ESTIMATE_FIELDS and more), bytes
    choice: dict = field(default_factory=dict)  # how the split was chosen: n, m, score, paper_split, stale, why
    board: dict | None = None  # the board budget `plan --board/--memory-budget` fitted, when it did

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"samples must be an integer >= 1, got {self.samples!r}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if self.quant not in QUANT_SCHEMES:
            raise ConfigError(f"quant must be one of {', '.join(QUANT_SCHEMES)}, got {self.quant!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def kept(self) -> list[int]:
        return list(self.skip.kept)

    @property
    def config_hash(self) -> str:
        return str(self.model.get("config_hash"))

    def with_board(self, board: dict) -> "PlanDocument":
        return replace(self, board=board)

    def to_dict(self) -> dict:
        return {"kind": PLAN_KIND, "version": PLAN_VERSION, "model": self.model,
                "plan": {**self.skip.to_dict(), **self.choice},
                "patch_schedule": self.schedule.to_dict(),
                "lora": {**asdict(self.lora), "target_modules": list(self.target_modules)},
                "samples": self.samples, "feature_dtype": self.feature_dtype, "quant": self.quant,
                "estimates": self.estimates, **({"board": self.board} if self.board is not None else {})}

    @classmethod
    def from_dict(cls, data, source: str = "plan") -> "PlanDocument":
        """Read and check a plan document; errors name `source` and the field."""
        if not isinstance(data, dict) or data.get("kind") != PLAN_KIND:
            raise InputError(f"{source} is not a blockskip plan (no \"kind\": \"{PLAN_KIND}\"); make one with "
                             "`blockskip plan`")
        version = data.get("version", 1)  # plans from before the field existed have today's layout
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"{source}: field 'version' must be a positive integer, got {version!r}")
        if version > PLAN_VERSION:
            raise InputError(f"{source} is a version {version} plan; this blockskip reads up to version "
                             f"{PLAN_VERSION}: upgrade blockskip or make the plan again with this one")

        def need(name: str, kind: type | tuple, where: dict = data, prefix: str = ""):
            if name not in where:
                raise InputError(f"{source}: field '{prefix}{name}' is missing")
            value = where[name]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise InputError(f"{source}: field '{prefix}{name}' must be "
                                 f"{getattr(kind, '__name__', 'a number')}, got {value!r}")
            return value

        def build(name: str, make):
            try:
                return make()
            except (ConfigError, KeyError, TypeError, ValueError) as err:
                raise InputError(f"{source}: field '{name}': {err}") from err

        model = need("model", dict)
        need("config_hash", str, model, "model.")
        need("family", str, model, "model.")
        plan = need("plan", dict)
        need("num_blocks", int, plan, "plan.")
        need("skipped", list, plan, "plan.")
        skip = build("plan", lambda: SkipPlan.from_dict(plan))
        choice = {k: v for k, v in plan.items() if k not in ("num_blocks", "skipped", "kept")}
        schedule = build("patch_schedule", lambda: PatchSchedule.from_dict(need("patch_schedule", dict)))
        lora = dict(need("lora", dict))
        targets = need("target_modules", list, lora, "lora.")
        if not all(isinstance(t, str) for t in targets):
            raise InputError(f"{source}: field 'lora.target_modules' must be a list of module names")
        settings = build("lora", lambda: LoraSettings(**{k: v for k, v in lora.items() if k != "target_modules"}))
        estimates = need("estimates", dict)
        for name in ESTIMATE_FIELDS:
            need(name, (int, float), estimates, "estimates.")
        board = data.get("board")
        if board is not None and not isinstance(board, dict):
            raise InputError(f"{source}: field 'board' must be an object, got {board!r}")
        samples = need("samples", int)
        if samples < 1:
            raise InputError(f"{source}: field 'samples' must be >= 1, got {samples}")
        for name, allowed in (("feature_dtype", FEATURE_DTYPES), ("quant", QUANT_SCHEMES)):
            if need(name, str) not in allowed:
                raise InputError(f"{source}: field '{name}' must be one of {', '.join(allowed)}, got {data[name]!r}")
        return cls(model=model, skip=skip, schedule=schedule, lora=settings, target_modules=tuple(targets),
                   samples=samples, feature_dtype=data["feature_dtype"], quant=data["quant"], estimates=estimates,
                   choice=choice, board=board)

    @classmethod
    def load(cls, path: str | Path) -> "PlanDocument":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"plan {str(path)!r} does not exist (run `blockskip plan` first)")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"plan {str(path)!r} is not JSON: {err}") from err
        return cls.from_dict(data, f"plan {str(path)!r}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

"""`blockskip generate`: images of the personalized subject, offline, on the best backend here.

Flow-matching Euler sampling with diffusers' scheduler and the model's own timestep shift
(`blockskip.models.pipeline.sample`); the transformer runs on a backend (`edge/backends.py`:
tensorrt, onnxruntime or torch; `auto` picks the best available and logs it). Text comes from
the bundle's prompt bank when the prompt is in it, else from the model's text encoder on disk;
with neither, the error lists the bank's prompts.

Writes `<out>/<nnn>-seed<seed>.png` (tEXt: prompt, seed, adapter hash, steps, backend, size),
`<out>/contact_sheet.png` and `<out>/generate.json` (the config, the backend, every image).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from blockskip.boards import add_budget_arguments, budget_from, generation_estimate, gib
from blockskip.edge.backends import BACKENDS, check_precision, pick_backend, resolve_backend
from blockskip.edge.lora import adapter_hash
from blockskip.edge.onnx_export import Shapes
from blockskip.errors import ConfigError, InputError
from blockskip.bundle import TrustPolicy, add_trust_arguments, trust_from_args
from blockskip.models.pipeline import load_model, sample
from blockskip.prompt_bank import load_negative, load_prompt_bank, open_bank

logger = logging.getLogger(__name__)

DEFAULT_CACHE = os.environ.get("BLOCKSKIP_CACHE", str(Path.home() / ".cache" / "blockskip"))


@dataclass
class GenerateConfig:
    model: str  # local model folder (diffusers layout, see models/pipeline.py)
    prompts: list[str]  # prompts to render, in order; bank prompts need no text encoder
    out_dir: str  # where the PNGs, the contact sheet and generate.json go
    adapter: str | None = None  # LoRA adapter folder or file (None: the base model)
    bundle: str | None = None  # bundle folder whose prompts/bank.* supplies text conditioning
    seed: int = 0  # image k of each prompt uses seed + k
    steps: int = 20  # Euler steps
    height: int = 512  # pixels; a multiple of the model's granularity (16 for FLUX)
    width: int = 512  # pixels; a multiple of the model's granularity
    count: int = 1  # images per prompt
    backend: str = "auto"  # auto | tensorrt | onnxruntime | torch
    cache_dir: str = DEFAULT_CACHE  # ONNX exports and TensorRT engines ($BLOCKSKIP_CACHE)
    precision: str | None = None  # fp32 | fp16 | int8 (onnxruntime); None: fp32 onnxruntime, fp16 tensorrt
    prompt_indices: list[int] = field(default_factory=list)  # bank entries to render as well
    guidance_scale: float | None = None  # classifier-free guidance (None: the family's default; SANA 4.5)
    board: str | None = None  # refuse at start a generation whose estimated peak does not fit this board
    memory_budget_gib: float | None = None  # ... or this many GiB (wins over the board's)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be the path of a model folder")
        if not isinstance(self.prompts, list) or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ConfigError("prompts must be a list of non-empty strings")
        if not self.prompts and not self.prompt_indices:
            raise ConfigError("prompts is empty: give at least one prompt (or prompt_indices with a bundle)")
        if self.prompt_indices and not self.bundle:
            raise ConfigError("prompt_indices needs bundle (the prompt bank they index)")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out_dir must be a folder path")
        for name, low in (("seed", 0), ("steps", 1), ("height", 1), ("width", 1), ("count", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision not in (None, "fp32", "fp16", "int8"):
            raise ConfigError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        if self.backend != "auto":
            check_precision(self.backend, self.precision)


# ---- helpers ---------------------------------------------------------------------------------
def resolve_texts(config: GenerateConfig) -> tuple[list[tuple[str, dict]], object | None]:
    """[(prompt, text conditioning)] and the model loaded with its text encoder (or None when
    the bank covered every prompt)."""
    bank = load_prompt_bank(config.bundle) if config.bundle else {}
    names = list(bank)
    prompts = list(config.prompts)
    for i in config.prompt_indices:
        if not 0 <= i < len(names):
            raise ConfigError(f"prompt_indices: {i} is not in the bank (it has {len(names)} prompts)")
        prompts.append(names[i])
    missing = [p for p in prompts if p not in bank]
    model = None
    if missing:
        model = load_model(config.model, text_encoder=True)
        if model.text_encoder is None:
            listed = "\n".join(f"  [{i}] {p}" for i, p in enumerate(names)) or "  (no bundle prompt bank given)"
            raise InputError(f"prompt {missing[0]!r} is not in the prompt bank and model {config.model!r} has no "
                             f"text encoder on disk; use one of the bank's prompts:\n{listed}")
    texts = [(p, bank[p] if p in bank else model.encode_text(p)) for p in prompts]
    return texts, model


def check_generation_budget(config: GenerateConfig, model, texts) -> None:
    """Refuse, before the transformer is loaded or exported, a generation whose estimated peak
    (blockskip.boards.generation_estimate) does not fit the board or budget of `config`."""
    budget = budget_from(config.board, config.memory_budget_gib)
    if budget is None:
        return
    backend = resolve_backend("onnxruntime" if config.backend == "auto" and config.precision == "int8"
                              else config.backend)  # as pick_backend chooses
    precision = check_precision(backend, config.precision) or "fp32"  # torch: the model's own (fp32) weights
    text_len = max((t["encoder_hidden_states"].shape[1] for _, t in texts), default=0)
    need = generation_estimate(model, config.height, config.width, precision, backend, text_len)["peak_bytes"]
    if need > budget.bytes:
        raise ConfigError(f"generating {config.width}x{config.height} with {backend} and {precision} weights needs "
                          f"about {gib(need)} but {budget.source} allows {gib(budget.bytes)}; `blockskip plan "
                          f"--board NAME` says what this board can generate with")


def sampling_model(model_dir: str, loaded=None):
    """The Model for the sampler. Non-torch backends need only the transformer's config (for
    input building), so its weights stay on the meta device and never fill memory."""
    return loaded if loaded is not None else load_model(model_dir, text_encoder=False, weights=False)


def negative_text(config: GenerateConfig, model, loaded) -> dict | None:
    """The empty prompt's conditioning for classifier-free guidance (families that use it):
    from the bank, else from the text encoder; None (no CFG, logged) without either."""
    if model.family.cfg_scale == 1.0 and config.guidance_scale in (None, 1.0):
        return None
    negative = load_negative(config.bundle) if config.bundle else None
    if negative is None and loaded is not None and loaded.text_encoder is not None:
        negative = loaded.encode_text("")
    if negative is None:
        logger.warning("no negative (empty-prompt) conditioning in the bank and no text encoder: "
                       "sampling without classifier-free guidance")
    return negative


def to_pil(image: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def save_png(image, path: Path, text: dict) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, "" if value is None else str(value))
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contact_sheet(paths: list[Path], out: Path, thumb: int = 256) -> Path:
    """All images in a grid, each fit into thumb x thumb."""
    from PIL import Image

    cols = max(1, math.ceil(math.sqrt(len(paths))))
    rows = max(1, math.ceil(len(paths) / cols))
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), "white")
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = thumb / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.NEAREST if scale >= 1 else Image.LANCZOS)
            sheet.paste(image, ((i % cols) * thumb, (i // cols) * thumb))
    sheet.save(out, format="PNG")
    return out


def peak_memory_bytes() -> int:
    """Peak memory of this process: the GPU allocator's when there is one, else peak RSS."""
    from blockskip.edge.train import peak_memory_bytes as peak

    return peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# ---- the job ---------------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised from the step callback when the caller asks to stop: ends the image being sampled."""


class Sampler:
    """Everything one generation sets up once: the prompts' text conditioning (bank or text
    encoder), the sampling model, the negative conditioning, and a backend per text length
    (exports have static shapes), for `config`'s model, adapter, size and backend. `image(prompt,
    seed)` then samples one image."""

    def __init__(self, config: GenerateConfig, trust: TrustPolicy | None = None):
        if config.bundle:
            config = replace(config, bundle=str(open_bank(config.bundle, trust or TrustPolicy())))
        self.config = config
        texts, loaded = resolve_texts(config)
        self.texts = dict(texts)
        self.order = [prompt for prompt, _ in texts]
        full = loaded if loaded is not None else (load_model(config.model, text_encoder=False)
                                                  if config.backend == "torch" else None)
        self.full = full
        self.model = sampling_model(config.model, full)
        check_generation_budget(config, self.model, texts)
        self.negative = negative_text(config, self.model, loaded)
        g = self.model.granularity
        if config.height % g or config.width % g:
            raise ConfigError(f"height and width must be multiples of {g} for this model, got "
                              f"{config.width}x{config.height}")
        self.adapter_id = adapter_hash(config.adapter) if config.adapter else None
        self.backends = {}

    def backend_for(self, text_len: int):
        if text_len not in self.backends:
            config = self.config
            shapes = Shapes(config.height, config.width, text_len)
            load = (lambda: self.full) if self.full is not None else None
            self.backends[text_len] = pick_backend(config.backend, config.model, config.adapter, shapes,
                                                   config.cache_dir, config.precision, load=load)
        return self.backends[text_len]

    def image(self, prompt: str, seed: int, on_step: Callable[[int, int], None] | None = None):
        """(PIL image, backend name) of `prompt` (one of the config's) from `seed`."""
        config, text = self.config, self.texts[prompt]
        backend = self.backend_for(text["encoder_hidden_states"].shape[1])
        images = sample(self.model, text, seed=seed, steps=config.steps, height=config.height, width=config.width,
                        predict=backend.predict, on_step=on_step, negative=self.negative,
                        guidance_scale=config.guidance_scale)
        return to_pil(images[0]), backend.name

    def describe(self) -> list[dict]:
        return [b.describe() for b in self.backends.values()]


class StepProgress:
    """Progress events over sampling steps (the agent's `progress`, the CLI's bar): counts steps,
    asks `should_stop` after each one (raising _Stopped), reports rate, peak memory and ETA."""

    def __init__(self, total: int, on_event: Callable[[dict], None] | None,
                 should_stop: Callable[[], bool] | None, done: int = 0):
        self.total, self.on_event, self.should_stop = total, on_event, should_stop
        self.done, self.start_done, self.start = done, done, time.perf_counter()

    def __call__(self, step: int, steps: int) -> None:
        if self.should_stop and self.should_stop():
            raise _Stopped
        self.done += 1
        rate = (self.done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)
        if self.on_event:
            self.on_event({"type": "progress", "step": self.done, "total": self.total, "steps_per_s": rate,
                           "peak_mem_bytes": peak_memory_bytes(), "eta_s": (self.total - self.done) / rate})


def generate(config: GenerateConfig, on_event: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None, trust: TrustPolicy | None = None) -> list[dict]:
    """Render every prompt `count` times; returns [{"path", "sha256", "prompt", "seed"}].

    A `bundle` (its prompt bank) is opened under `trust`, the board's TrustPolicy; the default
    trusts nothing. `should_stop()` is asked after every sampling step: when true, the image being
    sampled is dropped and generation ends (the report says `stopped`)."""
    sampler = Sampler(config, trust)
    config = sampler.config
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    progress = StepProgress(len(sampler.order) * config.count * config.steps, on_event, should_stop)
    stopped = False
    try:
        for prompt in sampler.order:
            for k in range(config.count):
                seed = config.seed + k
                image, backend = sampler.image(prompt, seed, progress)
                path = out / f"{len(results):03d}-seed{seed}.png"
                meta = {"prompt": prompt, "seed": seed, "adapter_hash": sampler.adapter_id, "steps": config.steps,
                        "backend": backend, "height": config.height, "width": config.width,
                        "model": config.model}
                digest = save_png(image, path, meta)
                results.append({"path": str(path), "sha256": digest, "prompt": prompt, "seed": seed})
                logger.info("wrote %s", path)
    except _Stopped:
        stopped = True
        logger.info("generation stopped after %d image(s)", len(results))
    if results:
        contact_sheet([Path(r["path"]) for r in results], out / "contact_sheet.png")
    report = {"config": asdict(config), "backends": sampler.describe(),
              "adapter_hash": sampler.adapter_id, "stopped": stopped, "images": results,
              "seconds": time.perf_counter() - start, "peak_mem_bytes": peak_memory_bytes()}
    (out / "generate.json").write_text(json.dumps(report, indent=2))
    return results


# ---- command line ----------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate images offline (TensorRT / ONNX Runtime / torch)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder (diffusers layout)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt (repeatable); needs a text encoder unless it is in the bundle's bank")
    parser.add_argument("--bank-index", action="append", type=int, default=[], metavar="I",
                        help="render entry I of the bundle's prompt bank (repeatable)")
    parser.add_argument("--bundle", help="bundle folder or .tar with prompts/bank.* (offline text conditioning); "
                                         "opened under the trust options below")
    parser.add_argument("--list-prompts", action="store_true", help="print the bundle's prompt bank and exit")
    parser.add_argument("--adapter", help="LoRA adapter folder or .safetensors (default: the base model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image of each prompt (default: 0)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default: %(default)s)")
    parser.add_argument("--height", type=int, default=512, help="pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512, help="pixels (default: %(default)s)")
    parser.add_argument("--count", type=int, default=1, help="images per prompt, seeds seed..seed+count-1")
    parser.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                        help="where the transformer runs; auto: tensorrt, else onnxruntime, else torch")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8", "nf4"],
                        help="export/engine precision (default: fp32 onnxruntime, fp16 tensorrt); int8: "
                             "ONNX Runtime dynamic int8 for CPU boards (auto then picks onnxruntime): "
                             "1.8x fp32 at 53 dB PSNR on a FLUX-shaped model, x86 CPU (edge/GENERATE.md); with "
                             "--backend torch, int8 or nf4 hold the blocks' Linear weights quantized (loaded one "
                             "block at a time, the adapter added first)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help="ONNX exports and engines (default: $BLOCKSKIP_CACHE or %(default)s)")
    parser.add_argument("--out", default="blockskip-images", help="output folder (default: %(default)s)")
    add_trust_arguments(parser)
    add_budget_arguments(parser, "the generation's estimated peak")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    trust = trust_from_args(args) if args.bundle else None
    if args.list_prompts:
        if not args.bundle:
            raise ConfigError("--list-prompts needs --bundle")
        for i, prompt in enumerate(load_prompt_bank(open_bank(args.bundle, trust))):
            print(f"[{i}] {prompt}")
        return 0
    config = GenerateConfig(model=args.model, prompts=args.prompt, out_dir=args.out, adapter=args.adapter,
                            bundle=args.bundle, seed=args.seed, steps=args.steps, height=args.height,
                            width=args.width, count=args.count, backend=args.backend,
                            cache_dir=args.cache_dir, precision=args.precision,
                            prompt_indices=args.bank_index, board=args.board, memory_budget_gib=args.memory_budget)
    progress = _Progress()
    results = generate(config, on_event=progress, trust=trust)
    progress.close()
    report = json.loads((Path(config.out_dir) / "generate.json").read_text())
    print(f"backend: {', '.join(b['backend'] for b in report['backends'])}")
    for item in results:
        print(f"{item['path']}  seed {item['seed']}  {item['prompt']!r}")
    print(f"contact sheet: {Path(config.out_dir) / 'contact_sheet.png'}")
    return 0


class _Progress:
    """tqdm on a terminal, driven by the progress events."""

    def __init__(self):
        self.bar = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event["total"], unit="step", desc="generate")
        self.bar.n = event["step"]
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

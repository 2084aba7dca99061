"""`blockskip train`: LoRA fine-tune of the kept blocks from a bundle's cached features.

Verifies the bundle first and refuses a bad one; a subject bundle also needs the base pack it names
by content hash (`--base-pack`: that base pack, or a folder of installed ones), verified under the
same trust policy. Builds only the kept blocks and the head (diffusers block modules, the base
pack's weights, int8 / NF4 Linear weights held quantized where the base pack ships them so; a
single bundle carries its own); puts LoRA on them with peft; trains with
the flow-matching loss on the cached features (entry state -> kept blocks -> + span residual ->
... -> head). Checkpoints atomically every N steps; `--resume` continues from the last one and
ends with the same adapter as an uninterrupted run.

Prior preservation: a bundle made with `prepare --prior-prompt` carries draws of the class images
the host generated (prior/features/); each micro-step then adds `--prior-weight` x the same loss on
a prior draw (DreamBooth's class-prior loss), in its own backward pass, so the peak is one draw's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from blockskip.basepack import weights_for
from blockskip.boards import GIB, RUNTIME_BYTES, add_budget_arguments, budget_from, gib
from blockskip.edge.lora import lora_config_dict, save_adapter, save_comfy_formats
from blockskip.edge.reduced import build_reduced, materialized_bytes
from blockskip.errors import ConfigError, InputError
from blockskip.bundle import TrustPolicy, add_trust_arguments, open_bundle, trust_from_args
from blockskip.features import FeatureReader
from blockskip.memory import TensorMemory
from blockskip.models.skip import reduced_forward
from blockskip.quant import register_with_peft

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
PRIOR_DIR = "prior"  # the prior draws inside a bundle (host/prior.py writes them)
PRIOR_SEED = 7919  # offsets the prior draws' order from the subject's


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps (paper: 500)
    grad_accum: int = 4  # micro-batches per optimizer step (paper: 4, batch 1)
    lr: float = 1e-4  # AdamW learning rate (paper: 1e-4)
    weight_decay: float = 1e-2  # AdamW weight decay on the LoRA weights
    warmup: int = 0  # linear warm-up steps of the learning rate
    seed: int = 0  # data order and LoRA init
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)
    resume: bool = False  # continue from out_dir/checkpoint.pt
    gradient_checkpointing: bool = False  # recompute kept blocks in backward to save activations
    device: str = "auto"  # auto | cpu | cuda
    prefetch: int = 4  # draws read ahead on a background thread
    output_format: str = "diffusers"  # diffusers | comfy (kohya-style keys)
    use_residuals: bool = True  # ablation: False drops the cached span residuals (the paper's "no residuals")
    track_memory: bool = False  # count live tensor bytes per op (blockskip.memory): exact peak on CPU, slower
    board: str | None = None  # refuse at start a bundle whose planned peak does not fit this board (blockskip.boards)
    memory_budget_gib: float | None = None  # ... or this many GiB (wins over the board's)
    prior_weight: float = 1.0  # weight of the class-prior loss where the bundle carries prior draws (0: off)

    def __post_init__(self):
        for name in ("steps", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.checkpoint_every < 0 or self.warmup < 0 or self.prefetch < 1:
            raise ConfigError("checkpoint_every and warmup must be >= 0 and prefetch >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not (self.prior_weight >= 0 and math.isfinite(self.prior_weight)):
            raise ConfigError(f"prior_weight must be a number >= 0, got {self.prior_weight}")
        if self.output_format not in ("diffusers", "comfy"):
            raise ConfigError(f"output_format must be diffusers or comfy, got {self.output_format!r}")


def draw_order(count: int, seed: int, position: int) -> int:
    """The draw used at global micro-step `position`: a seeded permutation per epoch."""
    epoch, offset = divmod(position, count)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(count, generator=gen)[offset])


class Prefetcher:
    """Reads draws ahead on a background thread; memory stays at `depth` draws."""

    def __init__(self, reader, positions, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._work, args=(reader, positions), daemon=True)
        self.thread.start()

    def _work(self, reader, positions) -> None:
        try:
            for position in positions:
                self.queue.put(reader.get(position))
        except Exception as err:  # surfaced in the training thread
            self.queue.put(err)

    def next(self):
        item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def avoid_cudnn_attention_backward() -> None:
    """Train with flash / memory-efficient attention, not cuDNN's. torch >= 2.11 picks cuDNN's SDPA
    backward on Hopper; on an H100 here it gave NaN LoRA gradients and, at FLUX.1-dev size, an
    illegal memory access (pytorch/pytorch#196678). Process-wide, as torch's switch is."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for but no CUDA device is available")
    return torch.device(name)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # fp32 on CPU
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _inject_lora(family, plan, lora: dict, seed: int):
    from peft import LoraConfig, inject_adapter_in_model


    targets = lora.get("target_modules") or [t for i in plan.kept for t in family.lora_targets(i, lora["scope"])]
    config = lora_config_dict(int(lora["rank"]), float(lora["alpha"]), targets)
    peft_config = LoraConfig(**config)
    register_with_peft(peft_config)  # quantized kept weights: peft's LoRA Linear over QuantLinear
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config, family.model, adapter_name="default")
    params = []
    for name, param in family.model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(param)
    return config, params


def _bundle_lock(bundle_dir: Path, job: str):
    """`<bundle>.inuse` while training: `blockskip deploy` refuses to overwrite a bundle in use."""
    lock = bundle_dir.with_name(bundle_dir.name + ".inuse")
    try:
        lock.write_text(json.dumps({"pid": os.getpid(), "job": job,
                                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    except OSError:
        logger.warning("could not write %s; deploy cannot see this job", lock)
        return None
    return lock


def check_training_budget(bundle, manifest: dict, budget) -> None:
    """Refuse, before anything is loaded, a bundle whose plan's estimated training peak (plus the
    runtime) does not fit `budget` (None: no check)."""
    if budget is None:
        return
    need = (manifest.get("estimates") or {}).get("train_memory_bytes")
    if need is None:
        raise ConfigError(f"bundle {bundle} records no memory estimate, so it cannot be checked against "
                          f"{budget.source}; train it without --board / --memory-budget")
    need += RUNTIME_BYTES
    if need > budget.bytes:
        board = f" --board {budget.board.name}" if budget.board else f" --memory-budget {budget.bytes / GIB:g}"
        raise ConfigError(f"training bundle {bundle} needs about {gib(need)} (its plan's estimate with the runtime) "
                          f"but {budget.source} allows {gib(budget.bytes)}; make a plan that fits with "
                          f"`blockskip plan{board} ...`")


def train(bundle: Path, out_dir: Path, config: TrainConfig, on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, trust: TrustPolicy | None = None,
          base_pack: Path | None = None) -> dict:
    """Train LoRA on a bundle; returns {"adapter", "steps", "final_loss", "stopped"}.

    The bundle is opened under `trust` (the board's TrustPolicy: trusted keys, or unsigned bundles
    allowed plainly); the default policy trusts nothing, so a caller has to say which keys it trusts.
    A subject bundle trains on the base pack it names by content hash, found at `base_pack` (that
    base pack, folder or .tar, or a folder of installed base packs) and opened under the same
    policy; a single bundle carries its weights and needs none.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict


    emit = on_event or (lambda event: None)
    trust = trust or TrustPolicy()
    bundle_dir = open_bundle(Path(bundle), trust)  # BundleError before anything is built
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    check_training_budget(bundle, manifest, budget_from(config.board, config.memory_budget_gib))
    weights, base_dir = weights_for(bundle_dir, manifest, base_pack, trust)  # the same policy for the base pack
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _pick_device(config.device)
    if device.type == "cuda":
        avoid_cudnn_attention_backward()
    family, plan = build_reduced(bundle_dir, manifest, device, weights=weights)
    lora_config, params = _inject_lora(family, plan, manifest["lora"], config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0)
    reader = FeatureReader(bundle_dir, family.prompt_cond_keys)
    prior_reader = None
    if manifest.get("prior") and config.prior_weight > 0:
        prior_reader = FeatureReader(bundle_dir / PRIOR_DIR, family.prompt_cond_keys)
    step, losses = 0, []
    checkpoint_path = out_dir / CHECKPOINT
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        set_peft_model_state_dict(family.model, state["lora"], adapter_name="default")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())  # map_location put it on the training device
        step, losses = int(state["step"]), list(state["losses"])
        logger.info("resumed at step %d from %s", step, checkpoint_path)
    elif config.resume:
        logger.warning("--resume given but %s does not exist; starting at step 0", checkpoint_path)

    def save_checkpoint() -> None:
        _save_atomic({"lora": get_peft_model_state_dict(family.model, adapter_name="default"),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "rng": torch.get_rng_state(), "step": step, "losses": losses,
                      "data_position": step * config.grad_accum}, checkpoint_path)

    amp = _autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    count = len(reader)
    positions = (draw_order(count, config.seed, p)
                 for p in range(step * config.grad_accum, config.steps * config.grad_accum))
    prefetch = Prefetcher(reader, positions, config.prefetch)
    prior_prefetch = None
    if prior_reader is not None:  # its own order: the same seed, another stream
        prior_prefetch = Prefetcher(prior_reader, (draw_order(len(prior_reader), config.seed + PRIOR_SEED, p)
                                                   for p in range(step * config.grad_accum,
                                                                  config.steps * config.grad_accum)),
                                    config.prefetch)
    prior_losses: list[float] = []
    locks = [_bundle_lock(folder, str(out_dir)) for folder in (bundle_dir, base_dir) if folder is not None]
    started, start_step, stopped = time.perf_counter(), step, False
    tracker = TensorMemory() if config.track_memory else None
    emit({"type": "start", "total": config.steps, "step": step, "kept_blocks": plan.kept,
          "model_bytes": materialized_bytes(family.model), "device": device.type})
    with contextlib.ExitStack() as cleanup:
        for lock in locks:
            if lock is not None:
                cleanup.callback(lock.unlink, missing_ok=True)
        if tracker:
            cleanup.enter_context(tracker)
        def backward(draw, weight: float) -> torch.Tensor:
            entry, residuals, cond, target, _ = draw
            if not config.use_residuals:
                residuals = {span: {k: torch.zeros_like(v) for k, v in r.items()} for span, r in residuals.items()}
            to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                output = reduced_forward(family, plan, to(entry),
                                         {s: to(r) for s, r in residuals.items()}, to(cond),
                                         checkpointing=config.gradient_checkpointing)
                prediction = family.output_to_latents(output, target.shape[2], target.shape[3])
                loss = torch.nn.functional.mse_loss(prediction.float(), target.to(device).float())
            scaled = loss / config.grad_accum
            if weight != 1.0:
                scaled = scaled * weight
            (scaler.scale(scaled) if scaler else scaled).backward()
            return loss.detach() / config.grad_accum

        while step < config.steps:
            loss_sum, prior_sum = 0.0, 0.0
            for _ in range(config.grad_accum):
                loss_sum += backward(prefetch.next(), 1.0)
                if prior_prefetch is not None:
                    prior_sum += backward(prior_prefetch.next(), config.prior_weight)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss_sum))
            if prior_prefetch is not None:
                prior_losses.append(float(prior_sum))
            rate = (step - start_step) / max(time.perf_counter() - started, 1e-9)
            emit({"type": "progress", "step": step, "total": config.steps, "loss": losses[-1],
                  **({"prior_loss": prior_losses[-1]} if prior_losses else {}),
                  "steps_per_s": rate, "peak_mem_bytes": peak_memory_bytes(device),
                  **({"peak_tensor_bytes": tracker.peak_bytes} if tracker else {}),
                  "eta_s": (config.steps - step) / rate if rate > 0 else None})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint()
            if should_stop and should_stop() and step < config.steps:
                save_checkpoint()
                stopped = True
                break
    state_dict = get_peft_model_state_dict(family.model, adapter_name="default")
    extra = {"bundle": manifest.get("content_sha256") or manifest.get("created"),
             **({"base_pack": manifest["base_pack"]["content_sha256"]} if base_dir else {}), "steps": step,
             "train_config": asdict(config), "kept_blocks": plan.kept, "family": family.name}
    if not stopped:
        adapter = save_adapter(state_dict, lora_config, out_dir, extra)
        if config.output_format == "comfy":
            save_comfy_formats(out_dir, family)
        (out_dir / "losses.json").write_text(json.dumps(losses))
        save_checkpoint()
    else:
        adapter = None
    result = {"adapter": str(adapter) if adapter else None, "steps": step,
              "final_loss": losses[-1] if losses else None, "stopped": stopped,
              "prior_weight": config.prior_weight if prior_reader is not None else 0.0}
    if tracker:
        result["peak_tensor_bytes"] = tracker.peak_bytes
    emit({"type": "done", **result})
    return result


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train LoRA on the kept blocks from a bundle (edge)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path,
                        help="subject bundle (or single bundle) folder or .tar, verified before anything runs")
    parser.add_argument("--base-pack", type=Path, metavar="PATH",
                        help="where the subject bundle's base pack is: the base pack itself (folder or .tar) or a "
                             "folder of installed base packs, searched by the content hash the subject bundle "
                             "names; verified under the same --key / --trust-config / --allow-unsigned policy")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the adapter and checkpoints")
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                        help="gradient accumulation (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between checkpoints (default: %(default)s)")
    parser.add_argument("--prior-weight", type=float, default=defaults.prior_weight,
                        help="weight of the class-prior loss on the bundle's prior draws (made with `prepare "
                             "--prior-prompt`; ignored for a bundle without them); 0 turns it off "
                             "(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute kept blocks in backward (less memory, more time)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="cpu trains in fp32; cuda in bf16 autocast (fp16 where bf16 is missing)")
    parser.add_argument("--format", dest="output_format", default="diffusers", choices=["diffusers", "comfy"],
                        help="'comfy' also writes ComfyUI/OneTrainer keys (comfy_lora.safetensors) and, "
                             "for FLUX, kohya sd-scripts keys (kohya_lora.safetensors)")
    add_trust_arguments(parser)
    parser.add_argument("--track-memory", action="store_true",
                        help="count the bytes of every live tensor per op and report the exact peak "
                             "(on a CPU the process RSS cannot tell tensors from the runtime); slower")
    add_budget_arguments(parser, "the bundle's planned training peak")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    config = TrainConfig(steps=args.steps, grad_accum=args.grad_accum, lr=args.lr, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, resume=args.resume,
                         gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                         output_format=args.output_format, track_memory=args.track_memory, board=args.board,
                         memory_budget_gib=args.memory_budget, prior_weight=args.prior_weight)
    if not args.bundle.exists():
        raise InputError(f"bundle {args.bundle} does not exist")
    trust = trust_from_args(args)
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=not sys.stderr.isatty())

    def on_event(event: dict) -> None:
        if event["type"] == "start":
            bar.n = event["step"]
            bar.refresh()
        elif event["type"] == "progress":
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}", mem=f"{event['peak_mem_bytes'] / 2**20:.0f}MiB")

    result = train(args.bundle, args.out, config, on_event=on_event, trust=trust, base_pack=args.base_pack)
    bar.close()
    print(f"adapter {result['adapter']} after {result['steps']} steps, final loss {result['final_loss']:.4f}")
    if "peak_tensor_bytes" in result:
        print(f"peak tensor memory {result['peak_tensor_bytes'] / 2**20:.1f} MiB")
    return 0

"""Edge boards: how much memory a blockskip job may use on each, and the check at start.

A board's usable memory is what the OS reports as total minus a reserve for the OS itself, the
agent and the runtime (on a Jetson the CUDA context lives in the same unified memory as
everything else). `blockskip plan --board NAME` chooses a plan that fits it; `blockskip train`
and `blockskip generate` with `--board NAME` (or `--memory-budget GiB`) refuse a job whose
estimated peak does not fit, before they load anything, instead of dying by the OOM killer.

Totals are what the boards' own tools report (`tegrastats` on a Jetson, `free` on a Pi), as
published for these modules; the reserves are this project's assumption for a headless board
running the agent (JetPack's CUDA context alone takes several hundred MiB). Neither was measured
on a board by this project: where a board runs more than the agent, give `--memory-budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockskip.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Board:
    name: str
    summary: str
    total_gib: float  # memory the OS reports
    reserve_gib: float  # the OS, the agent, the runtime (CUDA context on a Jetson)
    unified: bool  # CPU and GPU share the memory (every Jetson)
    device: str  # training device: "cuda" (Jetson) or "cpu" (Pi)
    backend: str  # generation backend: "tensorrt" (Jetson) or "onnxruntime" (Pi)

    @property
    def usable_bytes(self) -> int:
        return int((self.total_gib - self.reserve_gib) * GIB)

    def describe(self) -> str:
        kind = "unified CPU+GPU" if self.unified else "CPU"
        return (f"{self.name} ({self.summary}: {self.total_gib:g} GiB {kind} memory - {self.reserve_gib:g} GiB "
                f"reserve = {self.usable_bytes / GIB:.1f} GiB usable)")


BOARDS = {board.name: board for board in (
    Board("orin-nano-8gb", "Jetson Orin Nano 8 GB", 7.6, 1.6, True, "cuda", "tensorrt"),
    Board("orin-nx-16gb", "Jetson Orin NX 16 GB", 15.3, 1.8, True, "cuda", "tensorrt"),
    Board("agx-orin-32gb", "Jetson AGX Orin 32 GB", 30.6, 2.0, True, "cuda", "tensorrt"),
    Board("agx-orin-64gb", "Jetson AGX Orin 64 GB", 61.4, 2.0, True, "cuda", "tensorrt"),
    Board("pi5-8gb", "Raspberry Pi 5 8 GB", 7.8, 1.0, False, "cpu", "onnxruntime"),
    Board("pi4-4gb", "Raspberry Pi 4 4 GB", 3.7, 0.8, False, "cpu", "onnxruntime"),
)}


@dataclass(frozen=True)
class Budget:
    """How many bytes a job may use, and where that number came from."""

    bytes: int
    source: str
    board: Board | None = None


def get_board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise ConfigError(f"unknown board {name!r}; known: {', '.join(BOARDS)} "
                          "(or give --memory-budget GiB)") from None


def budget_from(board: str | None = None, memory_budget_gib: float | None = None) -> Budget | None:
    """The budget a command was given: a board's usable memory, an explicit number of GiB (which
    wins over the board's, for a board that runs more than the agent), or None for no check."""
    chosen = get_board(board) if board else None
    if memory_budget_gib is not None:
        if not memory_budget_gib > 0:
            raise ConfigError(f"--memory-budget must be > 0 GiB, got {memory_budget_gib}")
        where = f" on {chosen.name}" if chosen else ""
        return Budget(int(memory_budget_gib * GIB), f"--memory-budget {memory_budget_gib:g} GiB{where}", chosen)
    if chosen:
        return Budget(chosen.usable_bytes, chosen.describe(), chosen)
    return None


def gib(count: float) -> str:
    if count >= 10 * GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / GIB:.2f} GiB" if count >= 0.1 * GIB else f"{count / 2**20:.0f} MiB"


def add_budget_arguments(parser, what: str) -> None:
    """--board and --memory-budget on a command whose peak is checked at start."""
    parser.add_argument("--board", choices=list(BOARDS),
                        help=f"check that {what} fits this board's usable memory before starting "
                             f"(`blockskip plan --help` lists the boards and their memory)")
    parser.add_argument("--memory-budget", type=float, metavar="GIB",
                        help=f"check that {what} fits this many GiB before starting (wins over --board's)")


# Bytes per weight as stored for generation: fp32 (ONNX Runtime's CPU default, torch), fp16 / bf16
# (TensorRT), int8 (ONNX Runtime's dynamic int8 export, or torch's blocks quantized by
# blockskip.quant: one byte a weight plus per-channel scales), nf4 (torch, blockskip.quant: 4-bit
# codes plus one 8-bit absmax per 64 weights and an fp32 scale per 256 blocks). Embedders and the head stay fp32 in an int8 export; they are a small share of a DiT's
# parameters and are counted at the weight rate here.
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
# What a generation backend runs at each weight precision it offers, lightest last; activations
# are fp32 on ONNX Runtime's CPU path and half precision elsewhere.
BACKEND_PRECISIONS = {"tensorrt": ("fp16",), "onnxruntime": ("fp32", "int8"), "torch": ("fp32", "int8", "nf4")}
# The process before any tensor: Python, torch, diffusers, peft and onnxruntime imported
# (measured: ru_maxrss 414 MiB on x86-64 with torch 2.13 CPU; the CUDA context on a Jetson is in
# the board's reserve).
RUNTIME_BYTES = 414 * 2**20


def generation_estimate(model, height: int, width: int, precision: str, backend: str, text_len: int) -> dict:
    """Peak bytes of one batch-1 image: the transformer's weights at `precision`, one block's
    working set (image + text tokens x width x 14 values; attention is fused, never a
    tokens x tokens matrix), the latent decoder's weights and its full-resolution activations
    (6 maps of its first stage's channels at H x W), and the runtime. Checked against the measured
    peak by benchmarks/board_fit.py."""
    if precision not in WEIGHT_BYTES:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(WEIGHT_BYTES)}")
    family = model.family
    config = family.config
    act = 2 if backend == "tensorrt" else 4  # TensorRT fp16; ONNX Runtime and torch compute in fp32
    params = sum(p.numel() for p in family.model.parameters())
    weights = params * WEIGHT_BYTES[precision]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (height // model.granularity) * (width // model.granularity)
    seq = family.sequence_length(tokens, text_len)
    working = seq * hidden * 14 * act
    decoder, decode = 0, 0
    vae = getattr(model.codec, "vae", None)
    if vae is not None:
        decoder = sum(p.numel() for name, p in vae.named_parameters() if not name.startswith("encoder.")) * act
        cfg = vae.config
        first = (cfg.block_out_channels if hasattr(cfg, "block_out_channels") else cfg.decoder_block_out_channels)[0]
        decode = 6 * first * height * width * act
    peak = weights + max(working, decode) + decoder + RUNTIME_BYTES
    return {"peak_bytes": int(peak), "weight_bytes": int(weights), "working_bytes": int(working),
            "decoder_bytes": int(decoder + decode), "runtime_bytes": RUNTIME_BYTES, "precision": precision,
            "backend": backend, "assumes": f"batch 1 at {width}x{height}"}


def generation_options(model, board: Board, height: int, width: int, text_len: int) -> list[dict]:
    """Every weight precision the board's generation backend offers, heaviest first, then the
    torch backend's quantized weights (int8, nf4), with their estimates."""
    options = [(board.backend, precision) for precision in BACKEND_PRECISIONS[board.backend]]
    options += [("torch", "int8"), ("torch", "nf4")]
    return [generation_estimate(model, height, width, precision, backend, text_len) for backend, precision in options]

"""`blockskip export`: prepare the transformer for a backend as its own step.

Exports the full transformer with the adapter merged to ONNX (one static size: height, width,
text length) into the cache that `blockskip generate` reads, and, where TensorRT and a CUDA GPU
are present and --engine is given, builds the refittable engine (or refits the cached one with
the new adapter). With --out the ONNX folder (transformer.onnx, .onnx.data and the sidecar JSON)
is also copied there, so it can be prepared on a host and carried to a board; point the board's
--cache-dir at a folder holding it under onnx/.

--precision int8 writes ONNX Runtime's dynamic int8 copy of the fp32 export (for CPU boards;
see edge/GENERATE.md); engines are fp16 (default) or fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from blockskip.edge.backends import cached_engine, check_precision
from blockskip.edge.generate import DEFAULT_CACHE
from blockskip.edge.onnx_export import Shapes, cached_onnx, read_sidecar
from blockskip.errors import ConfigError
from blockskip.bundle import TrustPolicy, add_trust_arguments, trust_from_args
from blockskip.models.pipeline import load_model
from blockskip.prompt_bank import load_prompt_bank, open_bank

logger = logging.getLogger(__name__)


def text_length(model_dir: str, bundle: str | None, trust: TrustPolicy | None = None) -> int:
    """Text tokens of this model's conditioning: from the bundle's prompt bank (opened under the
    board's trust policy), else from its text encoder."""
    if bundle:
        bank = load_prompt_bank(open_bank(bundle, trust or TrustPolicy()))
        lengths = {t["encoder_hidden_states"].shape[1] for t in bank.values()}
        if len(lengths) != 1:
            raise ConfigError(f"the prompt bank of {bundle} mixes text lengths {sorted(lengths)}; give --text-len")
        return lengths.pop()

    model = load_model(model_dir, text_encoder=True)
    return model.encode_text("a")["encoder_hidden_states"].shape[1]


def export(model_dir: str, adapter: str | None, shapes: Shapes, cache_dir: str, precision: str | None = None,
           engine: bool = False, out: str | None = None) -> dict:
    """ONNX (and engine) for this model, adapter and size; returns what was written."""
    check_precision("tensorrt" if engine else "onnxruntime", precision)
    onnx_path = cached_onnx(model_dir, adapter, shapes, cache_dir, "fp32" if engine else (precision or "fp32"))
    report = {"onnx": str(onnx_path), "sidecar": read_sidecar(onnx_path)}
    if engine:
        backend = cached_engine(model_dir, adapter, shapes, cache_dir, precision or "fp16")
        report["engine"] = backend.describe()
    if out:
        target = Path(out)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(onnx_path.parent, target, ignore=shutil.ignore_patterns("ort-trt-cache"))
        report["copied_to"] = str(target)
    return report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export the transformer (adapter merged) to ONNX; build/refit a TensorRT engine",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder (diffusers layout)")
    parser.add_argument("--adapter", help="LoRA adapter folder or .safetensors to merge (default: none)")
    parser.add_argument("--height", type=int, default=512, help="image height in pixels (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512, help="image width in pixels (default: %(default)s)")
    parser.add_argument("--text-len", type=int,
                        help="text tokens (default: from --bundle's prompt bank, else the model's text encoder)")
    parser.add_argument("--bundle", help="bundle with a prompt bank (gives the text length); opened under the "
                                         "trust options below")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                        help="ONNX weights precision, or the engine's with --engine (default: fp32 / fp16); "
                             "int8: ONNX Runtime's transformer optimizer + dynamic int8, for CPU boards "
                             "(1.8x fp32 at 53 dB PSNR on a FLUX-shaped model, x86 CPU; not with --engine)")
    parser.add_argument("--engine", action="store_true",
                        help="also build (or refit) the TensorRT engine; needs TensorRT and a CUDA GPU")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help="where exports and engines are kept (default: $BLOCKSKIP_CACHE or %(default)s)")
    parser.add_argument("--out", help="also copy the ONNX folder here, to carry it to a board")
    add_trust_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text_len = args.text_len or text_length(args.model, args.bundle, trust_from_args(args) if args.bundle else None)
    shapes = Shapes(args.height, args.width, text_len)
    report = export(args.model, args.adapter, shapes, args.cache_dir, args.precision, args.engine, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "sidecar"}, indent=2))
    return 0

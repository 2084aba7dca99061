"""The full transformer as ONNX, with the LoRA adapter merged into its weights.

One ONNX file per (model weights, adapter, precision, shapes), cached under a cache folder:

    <cache>/onnx/<key>/transformer.onnx        the graph (opset 20)
    <cache>/onnx/<key>/transformer.onnx.data   the weights (external data, one initializer per
                                               parameter, named exactly as the torch parameter)
    <cache>/onnx/<key>/transformer.json        the config it came from: model hash, adapter
                                               hash, family, precision, input names and shapes

Shapes are static: one (height, width, text length, batch) per file; another size is another
file. The exporter is torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with its
graph optimizer off: the onnxscript optimizer drops SANA's `+ 1e-15` in linear attention and the
graph then yields NaN (found on onnxscript shipped with torch 2.13); ONNX Runtime and TensorRT run
their own graph optimizations anyway. Every export is checked against torch before it is kept.

int8 (`quantize_int8`, for ONNX Runtime on CPU boards) is made from the fp32 export of the same
model, adapter and shapes: ONNX Runtime's transformer optimizer, its basic graph optimizations
(folding the weights' transposes), then `quantize_dynamic` (int8 weights, uint8 activations
quantized at run time). It is cached under its own key and checked against torch like the rest.

A new adapter does not need a new export: because initializer names are the parameter names,
`refit_onnx` writes the newly merged weights into a copy of an existing export of the same model
and shapes (seconds, no tracing). That is the same by-name refit TensorRT does on an engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from blockskip.edge.lora import adapter_hash, load_adapter
from blockskip.errors import ConfigError, InputError
from blockskip.models.pipeline import load_model

logger = logging.getLogger(__name__)

OPSET = 20  # TensorRT 10 parses opsets 9..20
ONNX_FILE = "transformer.onnx"
SIDECAR = "transformer.json"
PRECISIONS = ("fp32", "fp16", "int8")  # what `cached_onnx` writes; int8 is derived from fp32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # torch dtype of the traced weights
# ONNX Runtime's transformer optimizer model type per family (`optimize_model(model_type=...)`):
# "mmdit" fuses FLUX's and SANA's LayerNorms here (no attention fusion matches the dynamo export)
OPTIMIZER_MODEL_TYPE = {"flux": "mmdit", "sana": "mmdit"}
# an int8 export is kept when ||ort - torch|| / ||torch|| on random latents and text is below this:
# a broken graph is ~100 % off (what this check measures is logged at INFO)
INT8_REL_ERROR = 0.10
# weights (by parameter name) whose linears stay fp32 in int8 exports: the timestep/text embedders
# and the output head. Measured on the FLUX-shaped benchmark model: quantizing them too costs 4 dB
# of image PSNR (54.6 -> 50.4); quantizing AdaLN's big modulation linears costs nothing (54.6)
# and shrinks the file 265 -> 157 MiB, so those are int8
KEEP_FP32 = r"(time_text_embed|time_embed|caption_projection|norm_out|^proj_out)\."


@dataclass(frozen=True)
class Shapes:
    """The static shapes one export (and one engine) serves."""

    height: int  # image height in pixels
    width: int  # image width in pixels
    text_len: int  # text tokens of the conditioning
    batch: int = 1  # images per transformer call

    def __post_init__(self):
        for name in ("height", "width", "text_len", "batch"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def key(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}t{self.text_len}"

    def to_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "text_len": self.text_len, "batch": self.batch}


# ---- identities ----------------------------------------------------------------------------
def model_hash(model_dir: str | Path) -> str:
    """sha256 (16 hex) over the transformer's config and weight files (`transformer/`, or the
    folder itself when it is a bare transformer folder with config.json at its root), memoized
    per file by (size, mtime) in `.blockskip-hash.json` there when the folder is writable."""
    root = Path(model_dir) / "transformer"
    if not root.is_dir():
        root = Path(model_dir)
        if not (root / "config.json").is_file():
            raise InputError(f"{str(model_dir)!r} has neither a transformer/ folder nor a config.json at its root")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = root / ".blockskip-hash.json"
    if memo.is_file():
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return saved["hash"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "hash": value}))
    except OSError:
        pass
    return value


def export_key(model_id: str, adapter_id: str | None, precision: str, shapes: Shapes) -> str:
    return f"{model_id}-{adapter_id or 'base'}-{precision}-{shapes.key()}"


# ---- the merged transformer ------------------------------------------------------------------
def merge_adapter(transformer: torch.nn.Module, adapter: str | Path | None) -> torch.nn.Module:
    """Load the adapter with diffusers' own loader, fuse it into the base weights, drop the
    LoRA layers. The result is a plain diffusers transformer; non-finite weights are refused."""
    if adapter is not None and getattr(transformer, "_blockskip_merged", None) != str(adapter):
        load_adapter(transformer, adapter)
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
        transformer._blockskip_merged = str(adapter)  # merging is in place: never merge twice
    for name, param in transformer.named_parameters():
        if not torch.isfinite(param).all():
            raise InputError(f"weight {name} is not finite after merging adapter {str(adapter)!r}; "
                             "the adapter (or the model) is broken and cannot be exported")
    return transformer.eval()


def example_inputs(model, shapes: Shapes, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Diffusers-forward inputs of the export's static shapes (values do not matter)."""
    family = model.family
    f = model.codec.factor
    latents = torch.zeros(shapes.batch, model.codec.channels, shapes.height // f, shapes.width // f)
    text = {"encoder_hidden_states": torch.zeros(1, shapes.text_len, family.text_shapes()["encoder_hidden_states"])}
    if "pooled_projections" in family.text_shapes():
        text["pooled_projections"] = torch.zeros(1, family.text_shapes()["pooled_projections"])
    if "encoder_attention_mask" in family.text_keys:
        text["encoder_attention_mask"] = torch.ones(1, shapes.text_len, dtype=torch.long)
    inputs = family.make_inputs(latents, torch.full((shapes.batch,), 0.5), text)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


# ---- export ----------------------------------------------------------------------------------
class _NoTorchvisionNotice(logging.Filter):
    """Drops the exporter's "torchvision is not installed. Skipping torchvision::nms" (one per
    torchvision op, at its first export): the transformers exported here use no torchvision op."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed. Skipping")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence two known-harmless notices of torch's dynamo exporter, and nothing else: the
    torchvision notice above and torch's own FutureWarning about its internal pytree LeafSpec.
    (`verbose=False` turns off its "[torch.onnx] ..." step lines.) Errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _NoTorchvisionNotice()
    registration.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(notice)


def export_onnx(model, adapter: str | Path | None, out_dir: str | Path, shapes: Shapes,
                precision: str = "fp32", model_id: str | None = None, check: bool = True) -> Path:
    """Export `model`'s transformer (a `blockskip.models.pipeline.Model`, loaded in full) with
    `adapter` merged to `out_dir/transformer.onnx`, check it against torch, write the sidecar."""
    if precision not in DTYPES:
        raise ConfigError(f"export_onnx traces fp32 or fp16, got {precision!r} (int8 is quantized from an fp32 "
                          "export: quantize_int8 / cached_onnx)")
    g = model.granularity
    if shapes.height % g or shapes.width % g:
        raise ConfigError(f"height and width must be multiples of {g} for this model, got "
                          f"{shapes.width}x{shapes.height}")
    transformer = _cast(merge_adapter(model.family.model, adapter), precision)
    inputs = example_inputs(model, shapes, DTYPES[precision])
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    logger.info("exporting %s transformer (%s) to ONNX at %s", model.family.name, shapes.key(), out)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(transformer, (), str(tmp / ONNX_FILE), kwargs={**inputs, "return_dict": False},
                          input_names=list(inputs), output_names=["output"], dynamo=True, verbose=False,
                          optimize=False, external_data=True, opset_version=OPSET)
    meta = {"model_hash": model_id, "adapter": str(adapter) if adapter else None,
            "adapter_hash": adapter_hash(adapter) if adapter else None, "family": model.family.name,
            "precision": precision, "shapes": shapes.to_dict(), "opset": OPSET,
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in inputs.items()},
            "output": "output", "torch": torch.__version__}
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
    if check:
        check_onnx(tmp / ONNX_FILE, transformer, inputs)
    _replace_dir(tmp, out)
    return out / ONNX_FILE


def check_onnx(onnx_path: Path, transformer: torch.nn.Module, inputs: dict, atol: float | None = None) -> float:
    """Run the export on ONNX Runtime (CPU) and torch on random inputs; raise if they differ."""
    import onnxruntime as ort

    if atol is None:
        atol = 1e-3 if next(transformer.parameters()).dtype == torch.float32 else 5e-2
    gen = torch.Generator().manual_seed(0)
    feeds = {k: (torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v)
             for k, v in inputs.items() if k not in ("img_ids", "txt_ids")}
    feeds = {**inputs, **feeds}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        want = transformer(**feeds, return_dict=False)[0]
    diff = float((torch.from_numpy(got).float() - want.float()).abs().max())
    if not diff <= atol * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"ONNX export of {onnx_path} disagrees with torch (max |diff| {diff:.3g}); "
                           "not keeping it")
    return diff


def refit_onnx(src_dir: str | Path, transformer: torch.nn.Module, out_dir: str | Path,
               meta_update: dict) -> Path:
    """Copy an export, replacing every initializer named like a parameter of `transformer`
    (already merged) with that parameter's value. No tracing; the graph is unchanged."""
    import onnx
    from onnx import numpy_helper

    src = Path(src_dir)
    model = onnx.load(str(src / ONNX_FILE))
    meta = json.loads((src / SIDECAR).read_text())
    params = {name: p.detach() for name, p in transformer.state_dict().items()}
    replaced = 0
    for init in model.graph.initializer:
        if init.name in params:
            value = params[init.name].to(DTYPES[meta["precision"]]).cpu().numpy()
            init.CopyFrom(numpy_helper.from_array(value, init.name))
            replaced += 1
    assert replaced, f"no initializer of {src} matches a parameter name; was it exported by export_onnx?"
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=ONNX_FILE + ".data", size_threshold=0)
    meta.update(meta_update, refit_from=str(src), refit_initializers=replaced)
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
    _replace_dir(tmp, out)
    logger.info("refit %d initializers of %s into %s", replaced, src, out)
    return out / ONNX_FILE


# ---- int8 (ONNX Runtime, CPU) -----------------------------------------------------------------
class _ToDebug(logging.Filter):
    """Turns records logged from inside the onnxruntime package (its quantization tools warn
    through the root logger, its transformer optimizer through loggers of its own) into debug
    records of this module's logger."""

    def __init__(self, package_dir: str):
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(self.package_dir):
            return True
        logger.debug("onnxruntime: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_ort_tools():
    """ONNX Runtime's optimizer and quantizer print to stdout ("failed in shape inference"), draw
    a tqdm bar and log advice about other models. All of that goes to this module's debug log:
    a filter on the root handlers takes the onnxruntime package's records, a NullHandler keeps
    `logging.warning` from configuring logging (basicConfig) when nothing has, and stdout and
    stderr are captured for the span of the call."""
    import io

    import onnxruntime

    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    handlers = list(root.handlers)
    ort_filter = _ToDebug(os.path.dirname(onnxruntime.__file__))
    for handler in handlers:
        handler.addFilter(ort_filter)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(ort_filter)
        root.removeHandler(guard)
        if captured.getvalue().strip():
            logger.debug("onnxruntime tools said:\n%s", captured.getvalue())


def quantize_int8(fp32_onnx: str | Path, out_dir: str | Path, optimize: bool = True) -> Path:
    """int8 copy of an fp32 export for ONNX Runtime on CPU boards: ONNX Runtime's transformer
    graph optimizer (`OPTIMIZER_MODEL_TYPE` of the family), its basic graph optimizations (which
    fold the weights' transposes), then dynamic quantization (`quantize_dynamic`: the blocks'
    MatMul/Gemm weights int8 per output channel in 7-bit range, activations uint8 per tensor,
    scaled at run time; KEEP_FP32 layers stay fp32). Inputs and output stay float32; the sidecar
    says `precision: int8`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(fp32_onnx)
    meta = read_sidecar(src)
    if meta["precision"] != "fp32":
        raise ConfigError(f"int8 is quantized from an fp32 export; {src} is {meta['precision']}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_type = OPTIMIZER_MODEL_TYPE.get(meta["family"]) if optimize else None
    source = src
    logger.info("quantizing %s to int8 (optimizer: %s)", src.parent.name, model_type or "off")
    with _quiet_ort_tools():
        if model_type:
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = optimize_model(str(src), model_type=model_type, opt_level=0, use_gpu=False)
            source = tmp / "optimized.onnx"
            optimized.save_model_to_file(str(source), use_external_data_format=True,
                                         all_tensors_to_one_file=True)
        # ONNX Runtime's basic graph optimizations fold Transpose(weight) into the weight, so every
        # linear becomes MatMul/Gemm on an initializer, which is what quantize_dynamic quantizes:
        # without it only the 15 Gemm of FLUX's embedders are quantized (1.1x, not 2x, measured).
        # Symbolic shape inference is skipped: it fails on the dynamo export's constants.
        folded = tmp / "folded.onnx"
        quant_pre_process(str(source), str(folded), skip_symbolic_shape=True, save_as_external_data=True,
                          all_tensors_to_one_file=True, external_data_location=folded.name + ".data")
        keep = _fp32_nodes(folded, source, KEEP_FP32)
        # reduce_range: 7-bit weights. x86 CPUs without VNNI (AVX2 only) multiply uint8 x int8 with a
        # saturating 16-bit pairwise add; full-range weights overflow it (measured: 26-32 dB image
        # PSNR vs 54 dB with reduce_range, same speed). ARM dot-product boards lose one weight bit.
        quantize_dynamic(str(folded), str(tmp / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=True, nodes_to_exclude=keep)
    for leftover in tmp.iterdir():
        if leftover.name not in (ONNX_FILE, ONNX_FILE + ".data"):
            leftover.unlink()
    meta.update(precision="int8", quantized_from=str(src.parent.name),
                quantization={"method": "onnxruntime.quantization.quantize_dynamic",
                              "weights": "int8 per channel, 7-bit range", "activations": "dynamic uint8",
                              "ops": ["MatMul", "Gemm"], "fp32": KEEP_FP32, "optimizer": model_type})
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
    _replace_dir(tmp, out)
    return out / ONNX_FILE


def _fp32_nodes(onnx_path: Path, source: Path, keep: str) -> list[str]:
    """MatMul/Gemm nodes of `onnx_path` (folded) that stay fp32: those whose weight is named like
    `keep`. A folded weight is named after the Transpose it replaced; `source` maps it back."""
    import re

    import onnx

    original = onnx.load(str(source), load_external_data=False).graph
    params = {i.name for i in original.initializer}
    alias = {n.output[0]: n.input[0] for n in original.node if n.op_type == "Transpose" and n.input[0] in params}
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    pattern = re.compile(keep)
    names = [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
             and pattern.search(alias.get(node.input[1], node.input[1]))]
    return names + [name + "_MatMul" for name in names]  # the quantizer renames Gemm to <name>_MatMul first


def check_int8(onnx_path: Path, transformer: torch.nn.Module, inputs: dict,
               max_rel: float = INT8_REL_ERROR) -> float:
    """Relative L2 error of an int8 export against the fp32 torch model on random latents and
    text (timestep and guidance as in `inputs`, like the sampler's); raise
    above `max_rel` (int8 cannot meet check_onnx's fp32 tolerance, but a broken graph is far off)."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    feeds = {**inputs, **{k: torch.randn(v.shape, generator=gen) for k, v in inputs.items()  # sampler-like:
                          if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")}}  # t kept
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0])
    with torch.no_grad():
        want = transformer(**feeds, return_dict=False)[0].float()
    rel = float((got.float() - want).norm() / want.norm().clamp_min(1e-12))
    if not rel <= max_rel:
        raise RuntimeError(f"int8 export {onnx_path} is {rel:.1%} off torch (limit {max_rel:.0%}); not keeping it")
    return rel


def _cast(transformer: torch.nn.Module, precision: str) -> torch.nn.Module:
    dtype = DTYPES[precision]
    return transformer if next(transformer.parameters()).dtype == dtype else transformer.to(dtype)


def read_sidecar(onnx_path: str | Path) -> dict:
    path = Path(onnx_path).with_name(SIDECAR)
    if not path.is_file():
        raise InputError(f"{path} is missing: an ONNX file for blockskip comes with the JSON it was "
                         "exported from (run `blockskip export`)")
    return json.loads(path.read_text())


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ---- the cache -------------------------------------------------------------------------------
def cached_onnx(model_dir: str | Path, adapter: str | Path | None, shapes: Shapes, cache_dir: str | Path,
                precision: str = "fp32", load=None) -> Path:
    """The ONNX for (model, adapter, precision, shapes) from the cache: as it is, else refit from
    an export of the same model and shapes with another adapter, else a fresh export.
    `load()` returns the full Model (only called when a file has to be written)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    mid = model_hash(model_dir)
    aid = adapter_hash(adapter) if adapter else None
    root = Path(cache_dir) / "onnx"
    target = root / export_key(mid, aid, precision, shapes)
    if (target / ONNX_FILE).is_file() and (target / SIDECAR).is_file():
        logger.info("using cached ONNX %s", target)
        return target / ONNX_FILE
    model = (load or (lambda: load_model(model_dir, text_encoder=False)))()
    if precision == "int8":  # quantized from the fp32 export of the same adapter (cached too)
        fp32 = cached_onnx(model_dir, adapter, shapes, cache_dir, "fp32", load=lambda: model)
        path = quantize_int8(fp32, target)
        rel = check_int8(path, merge_adapter(model.family.model, adapter), example_inputs(model, shapes))
        logger.info("int8 export %s: %.2f%% relative error vs torch fp32 on random inputs", target.name, 100 * rel)
        return path
    siblings = sorted(root.glob(f"{mid}-*-{precision}-{shapes.key()}")) if root.is_dir() else []
    siblings = [s for s in siblings if (s / SIDECAR).is_file() and s != target]
    if siblings:
        transformer = _cast(merge_adapter(model.family.model, adapter), precision)
        path = refit_onnx(siblings[0], transformer, target,
                          {"adapter": str(adapter) if adapter else None, "adapter_hash": aid})
        check_onnx(path, transformer, example_inputs(model, shapes, DTYPES[precision]))
        return path
    return export_onnx(model, adapter, target, shapes, precision, model_id=mid)

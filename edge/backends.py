"""Where the transformer runs during sampling: one small interface, three implementations.

    backend = pick_backend("auto", model_dir, adapter=..., shapes=..., cache_dir=...)
    images = sample(model, text, ..., predict=backend.predict)

- `torch`: the diffusers transformer with the adapter fused (the reference).
- `onnxruntime`: the merged transformer exported to ONNX (`onnx_export.py`), on the best
  provider ONNX Runtime has here: TensorRT EP, then CUDA EP, then CPU EP.
- `tensorrt`: an engine built (fp16 or fp32, `builder_flags`) from that ONNX, constant-folded
  with the weights' names kept (`trt_onnx.py`), with the REFIT flag; a new adapter is applied by
  refitting the engine's weights by name from the new ONNX, never by rebuilding. Engines are
  cached by (model hash, precision, shapes, TensorRT version); the sidecar JSON says which
  adapter is in the engine now.

`auto` takes the first available of tensorrt (TensorRT importable and a CUDA GPU), onnxruntime,
torch, and logs which it chose (`backend.name` says it too).
"""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch

from blockskip.edge.lora import adapter_hash, load_adapter, read_adapter
from blockskip.edge.onnx_export import cached_onnx, merge_adapter, model_hash, read_sidecar, Shapes
from blockskip.errors import ConfigError, InputError, NotAvailableError
from blockskip.models.pipeline import load_model
from blockskip.quant import quantize_linears

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_HINT = ("TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); "
            "on an x86 host with CUDA: pip install 'dit-blockskip[trt]'")


class Backend(abc.ABC):
    """Runs the transformer: diffusers-forward inputs in, the forward's output out."""

    name: str

    @abc.abstractmethod
    def predict(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Same contract as `family.diffusers_forward(**inputs)`; returns a CPU float tensor."""

    def describe(self) -> dict:
        return {"backend": self.name}


# ---- torch -----------------------------------------------------------------------------------
class TorchBackend(Backend):
    name = "torch"

    def __init__(self, transformer: torch.nn.Module, adapter: str | Path | None = None,
                 device: str | None = None, fuse: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if adapter is not None and fuse:
            transformer = merge_adapter(transformer, adapter)
        elif adapter is not None:
            load_adapter(transformer, adapter)
        self.transformer = transformer.to(self.device).eval()
        self.dtype = next(transformer.parameters()).dtype

    @torch.no_grad()
    def predict(self, inputs):
        moved = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return self.transformer(**moved, return_dict=False)[0].float().cpu()

    def describe(self):
        quant = getattr(self.transformer, "_blockskip_quant", None)
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype),
                **({"weights": quant} if quant else {})}


def quantized_transformer(model_dir: str | Path, adapter: str | Path | None, scheme: str) -> torch.nn.Module:
    """The model's transformer with every block's nn.Linear weights held as `scheme` ("int8" or
    "nf4", blockskip.quant) for generation with the torch backend. Built on the meta device and
    filled one block at a time from the model's safetensors, the adapter's update (B @ A, at its
    stored scale) added to a weight before it is quantized: at most one block is ever in full
    precision. Embedders, norms and the head stay as stored."""
    from safetensors import safe_open


    family = load_model(model_dir, text_encoder=False, weights=False).family
    transformer = family.model
    root = Path(model_dir)
    folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no .safetensors weights (the torch backend's {scheme} weights are made "
                         "from them; pickled .bin weights are never loaded)")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: handle for handle in handles for key in handle.keys()}
    updates = {}
    if adapter is not None:
        tensors, config = read_adapter(adapter)
        for key, down in tensors.items():
            if ".lora_A." in key:
                up = tensors[key.replace(".lora_A.", ".lora_B.")]
                scale = float(config.get("lora_alpha", down.shape[0])) / float(config.get("r", down.shape[0]))
                updates[key.removeprefix("transformer.").split(".lora_A.")[0]] = scale * (up.float() @ down.float())
    names = {id(module): name for name, module in transformer.named_modules()}
    blocks = {names[id(family.block(i))] for i in range(family.num_blocks)}

    def fill(prefix: str, module: torch.nn.Module) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, param in module.named_parameters():
                key = f"{prefix}.{name}" if prefix else name
                if key not in where:
                    raise InputError(f"{folder}: weight {key} is missing from the safetensors files")
                param.copy_(where[key].get_tensor(key).to(param.dtype))
            for name, linear in list(module.named_modules()):
                path = f"{prefix}.{name}" if name else prefix
                if path in updates:
                    linear.weight.add_(updates.pop(path).to(linear.weight.dtype))

    for name, module in transformer.named_children():
        if isinstance(module, torch.nn.ModuleList) and any(f"{name}.{i}" in blocks for i in range(len(module))):
            for i, block in enumerate(module):
                fill(f"{name}.{i}", block)
                quantize_linears(block, scheme)
        else:
            fill(name, module)
    for name, param in list(transformer.named_parameters(recurse=False)):  # e.g. SANA's scale_shift_table
        if name not in where:
            raise InputError(f"{folder}: weight {name} is missing from the safetensors files")
        transformer._parameters[name] = torch.nn.Parameter(where[name].get_tensor(name).to(param.dtype),
                                                           requires_grad=False)
    if updates:
        raise InputError(f"adapter {adapter} names modules this model does not have: {', '.join(sorted(updates)[:3])}")
    transformer._blockskip_quant = scheme
    return transformer.eval()


# ---- ONNX Runtime ----------------------------------------------------------------------------
def ort_providers() -> list[str]:
    """The providers this ONNX Runtime build has, best first."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in ORT_PROVIDERS if p in available]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        self.meta = read_sidecar(self.path)
        # int8 exports are for the CPU EP (its dynamic-quantization kernels); GPUs take TensorRT
        wanted = providers or (["CPUExecutionProvider"] if self.meta.get("precision") == "int8" else ort_providers())
        options = []
        for provider in wanted:
            if provider == "TensorrtExecutionProvider":
                cache = str(self.path.parent / "ort-trt-cache")
                options.append((provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                           "trt_fp16_enable": self.meta.get("precision") == "fp16"}))
            else:
                options.append(provider)
        session_options = ort.SessionOptions()
        if threads:
            session_options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), session_options, providers=options)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        logger.info("onnxruntime session on %s with %s", self.path, self.providers)

    def predict(self, inputs):
        feeds = {}
        for name in self.input_names:
            if name not in inputs:
                raise InputError(f"{self.path} expects input {name!r} that the sampler did not give")
            value = inputs[name]
            spec = self.meta["inputs"][name]
            if list(value.shape) != spec["shape"]:
                raise ConfigError(f"{self.path} was exported for {name} of shape {spec['shape']}, got "
                                  f"{list(value.shape)}: export again for this size (`blockskip export`)")
            feeds[name] = value.to(getattr(torch, spec["dtype"])).cpu().numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0]).float()

    def describe(self):
        return {"backend": self.name, "providers": self.providers, "onnx": str(self.path),
                "precision": self.meta.get("precision"), "adapter_hash": self.meta.get("adapter_hash")}


# ---- TensorRT --------------------------------------------------------------------------------
def import_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise NotAvailableError(TRT_HINT)
    import tensorrt as trt

    return trt


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def engine_key(model_id: str, precision: str, shapes: Shapes, trt_version: str) -> str:
    return f"{model_id}-{precision}-{shapes.key()}-trt{trt_version}"


ENGINE_PRECISIONS = ("fp16", "fp32")


def builder_flags(precision: str) -> list[str]:
    """`trt.BuilderFlag` names an engine of `precision` is built with. Every engine is REFIT
    (a new adapter is new weights by name). fp16 lets TensorRT pick fp16 kernels where they are
    faster (layers it keeps in fp32 stay fp32); fp32 leaves TF32 on (TensorRT's default on
    Ampere/Orin). int8 is not offered: TensorRT 10 deprecates implicit (calibrated) int8, and
    explicit int8 needs Q/DQ scales that change with every adapter, so such an engine could not
    be refit; ONNX Runtime's int8 (`--backend onnxruntime --precision int8`) covers CPU boards."""
    if precision not in ENGINE_PRECISIONS:
        raise ConfigError(f"TensorRT engine precision must be one of {', '.join(ENGINE_PRECISIONS)}, "
                          f"got {precision!r}")
    return ["REFIT", "FP16"] if precision == "fp16" else ["REFIT"]


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16",
                 workspace_bytes: int | None = None) -> Path:
    """Parse the ONNX and build a refittable engine (minutes to hours on a Jetson)."""
    flags = builder_flags(precision)
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network_flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for flag in flags:  # REFIT: weights can be replaced later by name
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    logger.info("building TensorRT engine from %s (%s); this can take long on a Jetson", onnx_path, precision)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    logger.info("engine built in %.1f s: %s", time.perf_counter() - start, engine_path)
    return engine_path


def refit_engine(engine, onnx_path: str | Path) -> int:
    """Replace the engine's weights by name with those of `onnx_path` (same graph, new adapter
    merged). Returns how many weights were refit."""
    trt = import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, trt_logger)
    if hasattr(trt, "OnnxParserRefitter"):  # TensorRT >= 10
        parser_refitter = trt.OnnxParserRefitter(refitter, trt_logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise RuntimeError(f"TensorRT could not refit from {onnx_path}: {errors}")
    else:  # TensorRT 8.6: set weights by ONNX initializer name
        import onnx
        from onnx import numpy_helper

        names = set(refitter.get_all_weights())
        keep = []
        for init in onnx.load(str(onnx_path)).graph.initializer:
            if init.name in names:
                array = numpy_helper.to_array(init).copy()
                keep.append(array)
                refitter.set_named_weights(init.name, trt.Weights(array))
    missing = refitter.get_missing_weights()
    if missing:
        raise RuntimeError(f"refit from {onnx_path} left weights unset: {list(missing)[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"TensorRT refit of the engine from {onnx_path} failed")
    return len(refitter.get_all_weights())


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise NotAvailableError("the tensorrt backend needs a CUDA GPU and none is visible")
        self.trt = trt
        self.path = Path(engine_path)
        self.meta = json.loads(self.path.with_suffix(".json").read_text())
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise InputError(f"{self.path} is not an engine this TensorRT ({trt.__version__}) can load")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def refit(self, onnx_path: str | Path, adapter_hash: str | None) -> None:
        """Apply another adapter: new merged weights from `onnx_path`, then save the engine."""
        start = time.perf_counter()
        count = refit_engine(self.engine, onnx_path)
        blob = self.engine.serialize()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(bytes(blob))
        os.replace(tmp, self.path)
        self.meta.update(adapter_hash=adapter_hash, onnx=str(onnx_path))
        self.path.with_suffix(".json").write_text(json.dumps(self.meta, indent=2))
        logger.info("refit %d weights in %.1f s (adapter %s)", count, time.perf_counter() - start, adapter_hash)

    @torch.no_grad()
    def predict(self, inputs):
        trt = self.trt
        stream = torch.cuda.current_stream()
        buffers, output = [], None
        for name in self.names:
            dtype = _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(self.engine.get_tensor_shape(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if name not in inputs:
                    raise InputError(f"engine {self.path} expects input {name!r}")
                tensor = inputs[name].to("cuda", dtype).contiguous()
                if tuple(tensor.shape) != shape:
                    raise ConfigError(f"engine {self.path} was built for {name} of shape {list(shape)}, got "
                                      f"{list(tensor.shape)}: export and build for this size")
            else:
                tensor = torch.empty(shape, dtype=dtype, device="cuda")
                output = tensor
            buffers.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path} failed")
        stream.synchronize()
        return output.float().cpu()

    def describe(self):
        return {"backend": self.name, "engine": str(self.path), "tensorrt": self.trt.__version__,
                "precision": self.meta.get("precision"), "adapter_hash": self.meta.get("adapter_hash")}


def _torch_dtype(np_dtype) -> torch.dtype:
    import numpy as np

    return torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype


def cached_engine(model_dir: str | Path, adapter: str | Path | None, shapes: Shapes, cache_dir: str | Path,
                  precision: str = "fp16", load=None) -> TrtBackend:
    """The engine for (model, precision, shapes, TensorRT version): built once, refit when the
    adapter differs from the one in it, reused otherwise."""
    from blockskip.edge.trt_onnx import cached_trt_onnx

    trt = import_tensorrt()
    builder_flags(precision)  # a bad precision fails before any export
    aid = adapter_hash(adapter) if adapter else None
    onnx_path = cached_trt_onnx(cached_onnx(model_dir, adapter, shapes, cache_dir, "fp32", load=load))
    mid = model_hash(model_dir)
    engine_path = Path(cache_dir) / "engines" / f"{engine_key(mid, precision, shapes, trt.__version__)}.engine"
    sidecar = engine_path.with_suffix(".json")
    if not (engine_path.is_file() and sidecar.is_file()):
        build_engine(onnx_path, engine_path, precision)
        meta = {"model_hash": mid, "precision": precision, "shapes": shapes.to_dict(),
                "tensorrt": trt.__version__, "adapter_hash": aid, "onnx": str(onnx_path),
                "onnx_sidecar": read_sidecar(onnx_path), "refittable": True}
        sidecar.write_text(json.dumps(meta, indent=2))
        return TrtBackend(engine_path)
    backend = TrtBackend(engine_path)
    if backend.meta.get("adapter_hash") != aid:
        backend.refit(onnx_path, aid)
    else:
        logger.info("using cached engine %s", engine_path)
    return backend


# ---- choosing --------------------------------------------------------------------------------
# precisions each backend runs (first: its default); the torch backend runs the checkpoint as is
BACKEND_PRECISIONS = {"torch": (None, "int8", "nf4"), "onnxruntime": ("fp32", "fp16", "int8"), "tensorrt": ENGINE_PRECISIONS}


def check_precision(backend: str, precision: str | None) -> str | None:
    """The precision `backend` will run (`precision` or its default); a clear error for a
    combination that does not exist (int8 is ONNX Runtime's, for CPU boards)."""
    allowed = BACKEND_PRECISIONS[backend]
    if precision is None:
        return allowed[0]
    if precision not in allowed:
        if backend == "torch":
            raise ConfigError(f"--precision {precision} is for the onnxruntime (fp32, fp16, int8) and tensorrt "
                              "(fp16, fp32) backends; the torch backend runs the model's own weights (leave "
                              "--precision out) or its blocks' Linear weights quantized (int8, nf4)")
        if backend == "tensorrt" and precision == "int8":
            raise ConfigError("--precision int8 is ONNX Runtime's dynamic int8 for CPU boards; TensorRT engines "
                              "here are fp16 or fp32 (use --backend onnxruntime for int8)")
        raise ConfigError(f"--precision for {backend} must be one of {', '.join(p for p in allowed if p)}, "
                          f"got {precision!r}")
    return precision


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, best first."""
    names = []
    if tensorrt_available():
        names.append("tensorrt")
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("onnxruntime")
    names.append("torch")
    return names


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    available = available_backends()
    if name == "auto":
        chosen = available[0]
        logger.info("backend auto chose %s (available here: %s)", chosen, ", ".join(available))
        return chosen
    if name == "tensorrt":
        import_tensorrt()
        if not torch.cuda.is_available():
            raise NotAvailableError("the tensorrt backend needs a CUDA GPU and none is visible")
    if name == "onnxruntime" and name not in available:
        raise NotAvailableError("onnxruntime is not installed: pip install 'dit-blockskip[edge]'")
    return name


def pick_backend(name: str, model_dir: str | Path, adapter: str | Path | None, shapes: Shapes,
                 cache_dir: str | Path, precision: str | None = None, load=None) -> Backend:
    """Open backend `name` ("auto" or one of BACKENDS) for this model, adapter and shapes.
    `load()` returns the full Model; it is called only when torch weights are needed."""
    # int8 exists only on ONNX Runtime: auto goes there rather than to TensorRT or torch
    chosen = resolve_backend("onnxruntime" if name == "auto" and precision == "int8" else name)
    precision = check_precision(chosen, precision)
    load = load or (lambda: load_model(model_dir, text_encoder=False))
    if chosen == "torch" and precision in ("int8", "nf4"):
        backend = TorchBackend(quantized_transformer(model_dir, adapter, precision), None)
    elif chosen == "torch":
        backend = TorchBackend(load().family.model, adapter)
    elif chosen == "onnxruntime":
        backend = OrtBackend(cached_onnx(model_dir, adapter, shapes, cache_dir, precision, load=load))
    else:
        backend = cached_engine(model_dir, adapter, shapes, cache_dir, precision, load=load)
    logger.info("backend %s: %s", backend.name, backend.describe())
    return backend

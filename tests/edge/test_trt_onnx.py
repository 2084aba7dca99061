"""What of the TensorRT path runs without TensorRT: the engine precision's builder flags, and the
ONNX an engine is built from (constant-folded by onnx-graphsurgeon, weights kept by name for
refit), which must give the export's outputs under ONNX Runtime (through polygraphy's runner)."""

from __future__ import annotations

import onnx
import pytest
import torch

from blockskip.edge.backends import builder_flags, check_precision
from blockskip.edge.onnx_export import Shapes, cached_onnx, example_inputs, read_sidecar
from blockskip.edge.trt_onnx import cached_trt_onnx
from blockskip.errors import ConfigError
from blockskip.models.pipeline import load_model, save_model, tiny_model

ATOL = 1e-5  # folding constants changes no arithmetic on the weights' path


def test_builder_flags_per_precision():
    assert builder_flags("fp16") == ["REFIT", "FP16"]
    assert builder_flags("fp32") == ["REFIT"]
    for bad in ("int8", "bf16", "fp8"):
        with pytest.raises(ConfigError, match="fp16, fp32"):
            builder_flags(bad)
    assert check_precision("tensorrt", None) == "fp16"
    with pytest.raises(ConfigError, match="onnxruntime for int8"):
        check_precision("tensorrt", "int8")


@pytest.fixture(scope="module", params=["flux", "sana"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"trt-onnx-{request.param}")
    model_dir = str(save_model(tiny_model(request.param), root / "model"))
    model = load_model(model_dir)
    shapes = Shapes(16, 16, model.encode_text("x")["encoder_hidden_states"].shape[1])
    source = cached_onnx(model_dir, None, shapes, root / "cache", "fp32")
    return {"model": model, "shapes": shapes, "source": source, "prepared": cached_trt_onnx(source)}


@pytest.mark.slow
def test_prepared_onnx_is_valid_smaller_and_keeps_every_weight_by_name(exported):
    onnx.checker.check_model(str(exported["prepared"]))
    source = onnx.load(str(exported["source"]))
    prepared = onnx.load(str(exported["prepared"]))
    assert len(prepared.graph.node) < 0.8 * len(source.graph.node)
    assert not any(node.op_type == "Constant" for node in prepared.graph.node)
    weights = lambda m: {i.name: tuple(i.dims) for i in m.graph.initializer}  # noqa: E731
    assert weights(source).items() <= weights(prepared).items()  # TensorRT refits by these names
    assert [i.name for i in prepared.graph.input] == [i.name for i in source.graph.input]
    assert read_sidecar(exported["prepared"])["prepared_for"] == "tensorrt"


def test_prepared_onnx_gives_the_exports_outputs_under_polygraphy_onnxrt(exported):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    gen = torch.Generator().manual_seed(0)
    inputs = example_inputs(exported["model"], exported["shapes"])
    feeds = []
    for t in (0.2, 0.9):
        noisy = {k: torch.randn(v.shape, generator=gen) for k, v in inputs.items()
                 if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")}
        feeds.append({k: v.numpy() for k, v in {**inputs, **noisy, "timestep": torch.tensor([t])}.items()})
    runners = [OnnxrtRunner(SessionFromOnnx(str(exported["source"])), name="export"),
               OnnxrtRunner(SessionFromOnnx(str(exported["prepared"])), name="prepared")]
    results = Comparator.run(runners, data_loader=feeds)
    assert bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=ATOL, rtol=0)))
    outputs = [list(iteration.values())[0] for _, iterations in results.items() for iteration in iterations]
    assert all(abs(out).max() > 0 for out in outputs)  # real outputs, not zeros on both sides


def test_prepared_onnx_is_made_once(exported):
    stamp = exported["prepared"].stat().st_mtime_ns
    assert cached_trt_onnx(exported["source"]) == exported["prepared"]
    assert exported["prepared"].stat().st_mtime_ns == stamp

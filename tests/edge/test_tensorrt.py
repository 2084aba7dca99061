"""TensorRT backend: engine build, refit with a new adapter equals torch, cache reuse.

Runs wherever TensorRT and a CUDA GPU are present; skips elsewhere. Not yet run: the machine
this was written on has neither (see edge/GENERATE.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blockskip.edge.onnx_export import Shapes
from blockskip.models.pipeline import load_model, save_model, tiny_model

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                       reason="TensorRT and a CUDA GPU are needed"),
]

ATOL = 2e-3  # fp32 engine vs torch; loose enough for TensorRT's tactic choices (TF32 may be used)


@pytest.fixture(scope="module", params=["flux", "sana"])
def setup(request, tmp_path_factory):
    from helpers import make_adapter

    root = tmp_path_factory.mktemp(f"trt-{request.param}")
    model_dir = str(save_model(tiny_model(request.param), root / "model"))
    model = load_model(model_dir)
    last = model.family.num_blocks - 2
    return {"dir": model_dir, "model": model, "cache": root / "cache",
            "a": make_adapter(model_dir, root / "a", [1, last], seed=1),
            "b": make_adapter(model_dir, root / "b", [1], seed=2),
            "shapes": Shapes(16, 16, model.encode_text("x")["encoder_hidden_states"].shape[1])}


def _reference(model_dir, adapter, inputs):
    from blockskip.edge.lora import load_adapter

    transformer = load_model(model_dir, text_encoder=False).family.model
    load_adapter(transformer, adapter)
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _inputs(model):
    text = model.encode_text("a photo of sks maize leaf")
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return model.family.make_inputs(latents, torch.tensor([0.6]), text)


def test_engine_build_refit_and_cache_reuse(setup):
    from blockskip.edge.backends import cached_engine

    inputs = _inputs(setup["model"])
    backend = cached_engine(setup["dir"], setup["a"], setup["shapes"], setup["cache"], precision="fp32")
    engine_file = backend.path
    built = engine_file.stat().st_mtime_ns
    torch.testing.assert_close(backend.predict(inputs), _reference(setup["dir"], setup["a"], inputs),
                               atol=ATOL, rtol=0)
    # a new adapter: the same engine file, refit (not rebuilt), equals torch with that adapter
    refit = cached_engine(setup["dir"], setup["b"], setup["shapes"], setup["cache"], precision="fp32")
    assert refit.path == engine_file and refit.meta["adapter_hash"] != backend.meta["adapter_hash"]
    got_b = refit.predict(inputs)
    torch.testing.assert_close(got_b, _reference(setup["dir"], setup["b"], inputs), atol=ATOL, rtol=0)
    # same adapter again: cache reuse, no build and no refit
    stamp = engine_file.stat().st_mtime_ns
    again = cached_engine(setup["dir"], setup["b"], setup["shapes"], setup["cache"], precision="fp32")
    assert engine_file.stat().st_mtime_ns == stamp and again.meta["adapter_hash"] == refit.meta["adapter_hash"]
    assert built <= stamp


def test_generate_on_tensorrt_is_deterministic(setup, tmp_path):
    from blockskip.edge.generate import GenerateConfig, generate

    kw = dict(model=setup["dir"], prompts=["a photo of sks maize leaf"], steps=3, height=16, width=16,
              backend="tensorrt", cache_dir=str(setup["cache"]), adapter=setup["a"])
    first = generate(GenerateConfig(out_dir=str(tmp_path / "1"), **kw))
    second = generate(GenerateConfig(out_dir=str(tmp_path / "2"), **kw))
    assert first[0]["sha256"] == second[0]["sha256"]


def test_auto_picks_tensorrt_here():
    from blockskip.edge.backends import resolve_backend

    assert resolve_backend("auto") == "tensorrt"

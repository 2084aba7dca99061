"""ONNX Runtime vs torch on the tiny models, with and without a merged adapter, and a changed
adapter applied by refitting the export's weights (equivalence tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blockskip.edge.backends import OrtBackend, TorchBackend
from blockskip.edge.lora import load_adapter
from blockskip.edge.onnx_export import Shapes, cached_onnx, export_onnx, model_hash, read_sidecar
from blockskip.errors import ConfigError, InputError
from blockskip.models.pipeline import load_model, sample, save_model, tiny_model
from helpers import make_adapter

ATOL = 1e-4  # fp32 ONNX Runtime vs torch, on outputs of magnitude ~1
IMAGE_ATOL = 1e-3  # a whole 3-step sample
SIZE = 16  # pixels; tiny models are pixel-space


def torch_reference(model_dir, adapter=None):
    """The diffusers transformer with the adapter loaded by diffusers' loader, not fused."""
    transformer = load_model(model_dir, text_encoder=False).family.model
    if adapter:
        load_adapter(transformer, adapter)
    return transformer.eval()


def inputs_for(model, seed):
    text = model.encode_text("a photo of sks maize leaf with rust")
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 3, SIZE, SIZE, generator=gen)
    return model.family.make_inputs(latents, torch.tensor([0.6]), text), text


@pytest.fixture(scope="module", params=["flux", "sana"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = str(save_model(tiny_model(request.param), root / "model"))
    model = load_model(model_dir)
    first_kept, last_kept = 1, model.family.num_blocks - 2
    adapter_a = make_adapter(model_dir, root / "adapter_a", [first_kept, last_kept], seed=1)
    adapter_b = make_adapter(model_dir, root / "adapter_b", [first_kept], seed=2)
    text_len = model.encode_text("x")["encoder_hidden_states"].shape[1]
    return {"dir": model_dir, "model": model, "a": adapter_a, "b": adapter_b, "root": root,
            "shapes": Shapes(SIZE, SIZE, text_len), "cache": root / "cache"}


@pytest.mark.slow
def test_equivalence_onnxruntime_matches_torch_without_adapter(setup):
    path = cached_onnx(setup["dir"], None, setup["shapes"], setup["cache"])
    ort_backend = OrtBackend(path)
    reference = torch_reference(setup["dir"])
    inputs, text = inputs_for(setup["model"], seed=0)
    with torch.no_grad():
        want = reference(**inputs, return_dict=False)[0]
    torch.testing.assert_close(ort_backend.predict(inputs), want, atol=ATOL, rtol=0)

    model = setup["model"]
    run = dict(text=text, seed=3, steps=3, height=SIZE, width=SIZE)
    images_ort = sample(model, predict=ort_backend.predict, **run)
    images_torch = sample(model, predict=lambda x: reference(**x, return_dict=False)[0], **run)
    torch.testing.assert_close(images_ort, images_torch, atol=IMAGE_ATOL, rtol=0)
    meta = read_sidecar(path)
    assert meta["adapter_hash"] is None and meta["model_hash"] == model_hash(setup["dir"])
    assert meta["shapes"] == setup["shapes"].to_dict()


@pytest.mark.slow
def test_equivalence_onnxruntime_matches_torch_with_adapter_merged(setup):
    out = setup["root"] / "fresh_a"
    path = export_onnx(load_model(setup["dir"], text_encoder=False), setup["a"], out, setup["shapes"])
    inputs, _ = inputs_for(setup["model"], seed=1)
    with torch.no_grad():
        want = torch_reference(setup["dir"], setup["a"])(**inputs, return_dict=False)[0]
        base = torch_reference(setup["dir"])(**inputs, return_dict=False)[0]
    got = OrtBackend(path).predict(inputs)
    assert (want - base).abs().max() > 100 * ATOL, "the test adapter must visibly change the output"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(TorchBackend(torch_reference(setup["dir"]), setup["a"]).predict(inputs),
                               want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_equivalence_changed_adapter_refits_onnx_and_matches_torch(setup):
    shapes, cache = setup["shapes"], setup["cache"]
    path_a = cached_onnx(setup["dir"], setup["a"], shapes, cache)
    path_b = cached_onnx(setup["dir"], setup["b"], shapes, cache)
    assert path_a != path_b
    meta_b = read_sidecar(path_b)
    assert meta_b.get("refit_from"), "a second adapter of the same model and size is applied by refit"
    assert meta_b["adapter_hash"] != read_sidecar(path_a)["adapter_hash"]
    inputs, _ = inputs_for(setup["model"], seed=2)
    got_a, got_b = OrtBackend(path_a).predict(inputs), OrtBackend(path_b).predict(inputs)
    with torch.no_grad():
        want_b = torch_reference(setup["dir"], setup["b"])(**inputs, return_dict=False)[0]
    assert (got_a - got_b).abs().max() > 100 * ATOL
    torch.testing.assert_close(got_b, want_b, atol=ATOL, rtol=0)
    # the cache is reused: asking again returns the same file without a new export
    mtime = path_b.stat().st_mtime_ns
    assert cached_onnx(setup["dir"], setup["b"], shapes, cache) == path_b
    assert path_b.stat().st_mtime_ns == mtime


def test_onnxruntime_refuses_other_shapes(setup):
    path = cached_onnx(setup["dir"], None, setup["shapes"], setup["cache"])
    model = setup["model"]
    text = model.encode_text("a leaf")
    inputs = model.family.make_inputs(torch.zeros(1, 3, 2 * SIZE, SIZE), torch.tensor([0.5]), text)
    with pytest.raises(ConfigError, match="export again"):
        OrtBackend(path).predict(inputs)


def test_export_refuses_non_finite_adapter(setup, tmp_path):
    from blockskip.edge.lora import read_adapter
    from safetensors.torch import save_file

    tensors, config = read_adapter(setup["b"])
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("inf")
    bad = tmp_path / "bad"
    bad.mkdir()
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, str(bad / "pytorch_lora_weights.safetensors"), metadata=metadata)
    with pytest.raises(InputError, match="not finite"):
        export_onnx(load_model(setup["dir"], text_encoder=False), str(bad), tmp_path / "x", setup["shapes"])


@pytest.mark.slow
def test_a_bare_transformer_folder_exports_to_onnx(tmp_path, capsys):
    """`load_model` takes a folder with config.json at its root; export (and so generate) takes it too."""
    from blockskip.cli import main

    tiny_model("flux").family.model.save_pretrained(tmp_path / "bare")
    code = main(["export", "--model", str(tmp_path / "bare"), "--height", "16", "--width", "16", "--text-len", "16",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    onnx_path = json.loads(out[out.index("{\n"):])["onnx"]  # the report (exporter notes may come before it)
    assert read_sidecar(Path(onnx_path))["model_hash"] == model_hash(tmp_path / "bare")
    (tmp_path / "bare" / "x.bin").write_bytes(b"changed")  # another file: another model identity
    assert model_hash(tmp_path / "bare") != read_sidecar(Path(onnx_path))["model_hash"]

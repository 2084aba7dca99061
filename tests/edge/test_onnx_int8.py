"""ONNX Runtime int8 exports (transformer optimizer + dynamic int8) for CPU boards: images close
to fp32's, cached under their own key, refused with a clear error where they do not apply."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from blockskip.cli import main
from blockskip.edge.backends import OrtBackend, check_precision
from blockskip.edge.onnx_export import Shapes, cached_onnx, read_sidecar
from blockskip.errors import ConfigError
from blockskip.models.pipeline import load_model, sample, save_model, tiny_model
from helpers import psnr

# int8 vs fp32 images of the same seed, 8 Euler steps at 16x16, pixels in [-1, 1] mapped to [0, 1].
# Measured when written (x86 AVX2): FLUX about 54 dB, SANA about 47 dB (tiny models with an
# adapter). Without reduce_range the same exports gave 28-31 dB (uint8 x int8 saturating on CPUs
# without VNNI), so the threshold sits between the two; a broken graph lands far lower.
MIN_PSNR_DB = 35.0
SIZE = 16


@pytest.fixture(scope="module", params=["flux", "sana"])
def setup(request, tmp_path_factory):
    from helpers import make_adapter

    root = tmp_path_factory.mktemp(f"int8-{request.param}")
    model_dir = str(save_model(tiny_model(request.param), root / "model"))
    model = load_model(model_dir)
    adapter = make_adapter(model_dir, root / "adapter", [1, model.family.num_blocks - 2], seed=1)
    text = model.encode_text("a photo of sks maize leaf with rust")
    shapes = Shapes(SIZE, SIZE, text["encoder_hidden_states"].shape[1])
    cache = root / "cache"
    return {"dir": model_dir, "model": model, "adapter": adapter, "text": text, "shapes": shapes, "cache": cache,
            "fp32": cached_onnx(model_dir, adapter, shapes, cache, "fp32"),
            "int8": cached_onnx(model_dir, adapter, shapes, cache, "int8")}


@pytest.mark.slow
def test_int8_export_is_quantized_and_its_images_are_close_to_fp32(setup):
    meta = read_sidecar(setup["int8"])
    assert meta["precision"] == "int8" and meta["adapter_hash"] == read_sidecar(setup["fp32"])["adapter_hash"]
    ops = {node.op_type for node in onnx.load(str(setup["int8"]), load_external_data=False).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, f"no int8 matmul in the graph: {sorted(ops)}"
    fp32, int8 = OrtBackend(setup["fp32"]), OrtBackend(setup["int8"])
    assert int8.providers == ["CPUExecutionProvider"] and int8.describe()["precision"] == "int8"
    model = setup["model"]
    negative = model.encode_text("") if model.family.cfg_scale != 1.0 else None
    for seed in (0, 1):
        run = dict(text=setup["text"], seed=seed, steps=8, height=SIZE, width=SIZE, negative=negative)
        want, got = sample(model, predict=fp32.predict, **run), sample(model, predict=int8.predict, **run)
        assert torch.isfinite(got).all()
        assert MIN_PSNR_DB <= psnr(got, want) < math.inf, f"seed {seed}: {psnr(got, want):.1f} dB"


def test_int8_and_fp32_are_cached_under_their_own_keys(setup):
    fp32_dir, int8_dir = setup["fp32"].parent, setup["int8"].parent
    assert fp32_dir != int8_dir and "-int8-" in int8_dir.name and "-fp32-" in fp32_dir.name
    stamp = setup["int8"].stat().st_mtime_ns
    again = cached_onnx(setup["dir"], setup["adapter"], setup["shapes"], setup["cache"], "int8",
                        load=lambda: pytest.fail("a cached int8 export must not load the model"))
    assert again == setup["int8"] and again.stat().st_mtime_ns == stamp


def test_generate_on_int8_writes_its_precision(setup, tmp_path):
    from blockskip.edge.generate import GenerateConfig, generate

    generate(GenerateConfig(model=setup["dir"], prompts=["a photo of sks maize leaf with rust"], steps=2,
                            height=SIZE, width=SIZE, backend="onnxruntime", precision="int8",
                            adapter=setup["adapter"], cache_dir=str(setup["cache"]), out_dir=str(tmp_path)))
    report = json.loads((tmp_path / "generate.json").read_text())
    assert report["backends"][0]["precision"] == "int8"
    assert report["backends"][0]["onnx"] == str(setup["int8"])


def test_bad_precision_combinations_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="torch backend"):
        check_precision("torch", "fp16")
    assert check_precision("torch", "nf4") == "nf4"
    with pytest.raises(ConfigError, match="onnxruntime for int8"):
        check_precision("tensorrt", "int8")
    assert check_precision("onnxruntime", None) == "fp32" and check_precision("tensorrt", None) == "fp16"
    model_dir = str(save_model(tiny_model("flux"), tmp_path / "model"))
    common = ["--model", model_dir, "--height", "16", "--width", "16", "--cache-dir", str(tmp_path / "cache")]
    assert main(["generate", *common, "--prompt", "x", "--backend", "torch", "--precision", "fp16",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["export", *common, "--engine", "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: --precision ") for line in err), err
    with pytest.raises(SystemExit):
        main(["generate", *common, "--prompt", "x", "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "a refused combination must not export anything"


@pytest.mark.slow
def test_int8_export_on_the_command_line_prints_only_its_result(tmp_path):
    """ONNX Runtime's optimizer and quantizer print and warn a lot; none of it reaches the console."""
    model_dir = str(save_model(tiny_model("sana"), tmp_path / "model"))
    done = subprocess.run([sys.executable, "-m", "blockskip", "export", "--model", model_dir, "--height", "16",
                           "--width", "16", "--precision", "int8", "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert Path(json.loads(done.stdout)["onnx"]).parent.name.split("-")[2] == "int8"

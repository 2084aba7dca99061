"""`generate`: the API the agent calls, the command line, the prompt bank, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blockskip.cli import main
from blockskip.edge.generate import GenerateConfig, generate
from blockskip.prompt_bank import load_prompt_bank, write_prompt_bank
from blockskip.errors import ConfigError, InputError
from blockskip.host.bundle import TrustPolicy, build_bundle, generate_keypair
from blockskip.models.pipeline import load_model, save_model, tiny_model

BANK = ["a photo of sks maize leaf with rust", "a photo of sks maize leaf, close-up"]


def bank_bundle(model, prompts, folder, key=None):
    """A real bundle holding only a prompt bank (what generate reads from a bundle)."""
    write_prompt_bank(folder.with_name(folder.name + "-stage"), model, prompts)
    return build_bundle(folder.with_name(folder.name + "-stage"), folder, {"contents": "prompt bank only"},
                        signing_key=key)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    generate_keypair(root / "host.key", root / "host.pub")
    out = {"trust": TrustPolicy((root / "host.pub",)), "pub": str(root / "host.pub")}
    for name in ("flux", "sana"):
        model = tiny_model(name)
        out[name] = str(save_model(model, root / name))
        out[f"{name}-bundle"] = str(bank_bundle(model, BANK, root / f"{name}-bundle", root / "host.key"))
    # a model folder without a text encoder: the board's case
    offline = save_model(tiny_model("flux"), root / "flux-offline")
    meta = json.loads((offline / "blockskip.json").read_text())
    meta.pop("text_encoder")
    (offline / "blockskip.json").write_text(json.dumps(meta))
    out["flux-offline"] = str(offline)
    out["cache"] = str(root / "cache")
    return out


def config(models, family, out, **kw):
    base = dict(model=models[family], prompts=[BANK[0]], out_dir=str(out), steps=3, height=16, width=16,
                backend="torch", cache_dir=models["cache"])
    return GenerateConfig(**{**base, **kw})


@pytest.mark.parametrize("field,value", [("steps", 0), ("height", -16), ("count", 0), ("seed", -1),
                                         ("backend", "cuda"), ("prompts", []), ("prompts", [""])])
def test_config_rejects_bad_values_naming_the_field(models, tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        config(models, "flux", tmp_path, **{field: value})


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sana"])
def test_same_seed_same_image_twice_torch(models, tmp_path, family):
    first = generate(config(models, family, tmp_path / "a", count=2))
    second = generate(config(models, family, tmp_path / "b", count=2))
    assert [r["sha256"] for r in first] == [r["sha256"] for r in second]
    assert first[0]["sha256"] != first[1]["sha256"], "seed and seed + 1 must give different images"


@pytest.mark.slow
def test_same_seed_same_image_twice_onnxruntime(models, tmp_path):
    first = generate(config(models, "flux", tmp_path / "a", backend="onnxruntime", seed=7))
    second = generate(config(models, "flux", tmp_path / "b", backend="onnxruntime", seed=7))
    assert first[0]["sha256"] == second[0]["sha256"]
    report = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert report["backends"][0]["backend"] == "onnxruntime"


@pytest.mark.slow
def test_pngs_carry_metadata_and_a_contact_sheet_is_written(models, tmp_path):
    events = []
    results = generate(config(models, "sana", tmp_path, prompts=BANK, count=2, seed=5), on_event=events.append)
    assert len(results) == 4 and {r["seed"] for r in results} == {5, 6}
    with Image.open(results[3]["path"]) as image:
        assert image.size == (16, 16)
        assert image.text["prompt"] == BANK[1] and image.text["seed"] == "6"
        assert image.text["steps"] == "3" and image.text["backend"] == "torch"
        assert "adapter_hash" in image.text
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.width >= 2 * 16 and sheet.height >= 2 * 16
    assert [e["step"] for e in events] == list(range(1, 13))
    assert events[-1]["total"] == 12 and events[-1]["eta_s"] == 0
    assert all(e["type"] == "progress" and e["peak_mem_bytes"] > 0 and e["steps_per_s"] > 0 for e in events)


def test_adapter_hash_in_metadata_and_adapter_changes_the_image(models, tmp_path):
    from helpers import make_adapter  # the trainer's file format

    adapter = make_adapter(models["flux"], tmp_path / "adapter", [1, 4], seed=3)
    base = generate(config(models, "flux", tmp_path / "base"))
    tuned = generate(config(models, "flux", tmp_path / "tuned", adapter=adapter))
    assert base[0]["sha256"] != tuned[0]["sha256"]
    with Image.open(tuned[0]["path"]) as image:
        from blockskip.edge.lora import adapter_hash

        assert image.text["adapter_hash"] == adapter_hash(adapter)


@pytest.mark.slow
def test_should_stop_ends_at_the_next_step_not_after_the_image(models, tmp_path):
    """A 300-step image takes minutes on a board: a stop must not wait for it to finish."""
    steps = []
    results = generate(config(models, "flux", tmp_path, count=3, steps=50), on_event=steps.append,
                       should_stop=lambda: len(steps) >= 60)  # asked for during the second image
    assert len(results) == 1, "the finished image is kept, the one being sampled is dropped"
    assert steps[-1]["step"] == 60, "no step ran after the stop was asked for"
    report = json.loads((tmp_path / "generate.json").read_text())
    assert report["stopped"] is True and len(report["images"]) == 1


def test_prompt_bank_round_trip(models):
    bank = load_prompt_bank(models["flux-bundle"])
    assert list(bank) == BANK
    want = tiny_model("flux").encode_text(BANK[1])
    assert set(bank[BANK[1]]) == set(want)
    for key in want:
        torch.testing.assert_close(bank[BANK[1]][key], want[key])


def test_offline_bank_prompt_needs_no_text_encoder(models, tmp_path):
    assert load_model(models["flux-offline"]).text_encoder is None
    offline = generate(config(models, "flux-offline", tmp_path / "off", prompts=[], prompt_indices=[0],
                              bundle=models["flux-bundle"]), trust=models["trust"])
    online = generate(config(models, "flux", tmp_path / "on"))
    assert offline[0]["prompt"] == BANK[0]
    with Image.open(offline[0]["path"]) as a, Image.open(online[0]["path"]) as b:
        assert a.tobytes() == b.tobytes(), "bank conditioning must equal the encoder's"
        assert a.text["model"] != b.text["model"]


def test_unknown_prompt_without_text_encoder_lists_the_bank(models, tmp_path):
    with pytest.raises(InputError) as err:
        generate(config(models, "flux-offline", tmp_path, prompts=["a dog"], bundle=models["flux-bundle"]),
                 trust=models["trust"])
    message = str(err.value)
    assert "a dog" in message and "text encoder" in message
    assert all(p in message for p in BANK)


def test_command_line_generate_and_list_prompts(models, tmp_path, capsys):
    assert main(["generate", "--model", models["flux"], "--bundle", models["flux-bundle"], "--list-prompts",
                 "--key", models["pub"]]) == 0
    assert BANK[1] in capsys.readouterr().out
    code = main(["generate", "--model", models["flux"], "--prompt", BANK[0], "--steps", "2", "--height", "16",
                 "--width", "16", "--backend", "torch", "--out", str(tmp_path), "--cache-dir", models["cache"]])
    assert code == 0
    assert (tmp_path / "000-seed0.png").is_file() and (tmp_path / "contact_sheet.png").is_file()
    assert main(["generate", "--model", models["flux"], "--prompt", "x", "--height", "17", "--width", "16",
                 "--backend", "torch", "--out", str(tmp_path / "bad")]) == 2
    assert "multiple" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_export_writes_a_carryable_onnx(models, tmp_path, capsys):
    code = main(["export", "--model", models["sana"], "--height", "16", "--width", "16",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "carry")])
    assert code == 0
    meta = json.loads((tmp_path / "carry" / "transformer.json").read_text())
    assert meta["shapes"] == {"height": 16, "width": 16, "text_len": 16, "batch": 1}
    assert (tmp_path / "carry" / "transformer.onnx").is_file()
    assert (tmp_path / "carry" / "transformer.onnx.data").is_file()
    assert '"onnx"' in capsys.readouterr().out


def test_auto_backend_says_which_it_chose(caplog):
    import logging

    from blockskip.edge.backends import available_backends, resolve_backend

    with caplog.at_level(logging.INFO, logger="blockskip.edge.backends"):
        chosen = resolve_backend("auto")
    assert chosen == available_backends()[0]
    assert f"backend auto chose {chosen}" in caplog.text


def test_tensorrt_without_tensorrt_is_a_clear_error(models, tmp_path):
    import importlib.util

    from blockskip.errors import NotAvailableError

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present here; tests/edge/test_tensorrt.py covers it")
    with pytest.raises(NotAvailableError, match="TensorRT|CUDA"):
        generate(config(models, "flux", tmp_path, backend="tensorrt"))


@pytest.mark.slow
def test_sana_uses_classifier_free_guidance_with_the_banks_negative(tmp_path):
    """SANA samples with CFG (scale 4.5) against the empty prompt stored in the prompt bank;
    scale 1 turns it off, and the two differ."""
    import torch

    from blockskip.prompt_bank import load_negative
    from blockskip.models.pipeline import sample, save_model, tiny_model

    model = tiny_model("sana")
    save_model(model, tmp_path / "model")
    bank_bundle(model, ["a leaf on soil"], tmp_path / "bundle")
    negative = load_negative(tmp_path / "bundle")
    assert negative is not None and torch.equal(negative["encoder_hidden_states"],
                                                model.encode_text("")["encoder_hidden_states"])
    text = model.encode_text("a leaf on soil")
    guided = sample(model, text, seed=0, steps=3, height=16, width=16, negative=negative)
    plain = sample(model, text, seed=0, steps=3, height=16, width=16, negative=negative, guidance_scale=1.0)
    assert (guided - plain).abs().max() > 1e-3
    from blockskip.edge.generate import GenerateConfig, generate

    results = generate(GenerateConfig(model=str(tmp_path / "model"), prompts=["a leaf on soil"],
                                      bundle=str(tmp_path / "bundle"), out_dir=str(tmp_path / "out"), steps=3,
                                      height=16, width=16, backend="torch", cache_dir=str(tmp_path / "c")),
                       trust=TrustPolicy(allow_unsigned=True))
    from PIL import Image
    import numpy as np

    produced = np.asarray(Image.open(results[0]["path"])).astype(float)
    expected = ((guided[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)
    assert abs(produced - expected).max() <= 1.0, "generate must apply the same guidance"

"""Quantized frozen kept weights (`blockskip plan --quant int8|nf4`): the host ships them quantized in
the base pack; the board trains LoRA on them (loss goes down, resume is exact), holds less than the
full-precision weights, and its adapter loads into the unquantized diffusers model."""

import json

import pytest
import torch
from safetensors import safe_open

from blockskip.edge.lora import read_adapter
from blockskip.edge.reduced import build_reduced
from blockskip.edge.train import TrainConfig, train
from blockskip.errors import BundleError, InputError
from blockskip.features import FeatureReader
from blockskip.host.basepack import build_base_pack, build_subject_bundle
from blockskip.host.bundle import TrustPolicy, generate_keypair, verify_bundle
from blockskip.models.pipeline import tiny_model
from blockskip.models.skip import reduced_forward
from blockskip.quant import QuantLinear
from helpers import bundle_loss, make_bundle

UNSIGNED_OK = TrustPolicy(allow_unsigned=True)
WEIGHTS = "weights/kept_blocks.safetensors"


def split(root, quant, name="flux", n=2, m=1, samples=4, signing_key=None):
    """(base pack, subject bundle) of one cache staging folder made from a plan with `quant`."""
    make_bundle(root, name, n, m, samples=samples, images=1, quant=quant)
    metadata = json.loads((root / "stage" / "bundle.json").read_text())
    base = build_base_pack(root / "stage", root / "base", metadata, signing_key=signing_key)
    return base, build_subject_bundle(root / "stage", root / "subject", metadata, base, signing_key=signing_key)


def reduced(subject, base):
    manifest = json.loads((subject / "manifest.json").read_text())
    return build_reduced(subject, manifest, weights=base / WEIGHTS)


def mean_loss(subject, base, adapter_dir=None):
    """The flow-matching loss over every cached draw, with the trained adapter or at LoRA's zero init."""
    return bundle_loss(subject, adapter_dir, weights=base / WEIGHTS)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_training_lowers_the_loss_and_resumes_to_the_same_adapter(tmp_path, quant):
    base, subject = split(tmp_path, quant)
    family, _ = reduced(subject, base)
    quantized = [m for m in family.model.modules() if isinstance(m, QuantLinear)]
    assert quantized and all(m.scheme == quant for m in quantized), "the board holds the Linear weights quantized"
    config = TrainConfig(steps=30, grad_accum=1, lr=3e-3, checkpoint_every=0)
    before = mean_loss(subject, base)
    train(subject, tmp_path / "whole", config, trust=UNSIGNED_OK, base_pack=base)
    after = mean_loss(subject, base, tmp_path / "whole")
    # as test_train's: the velocity target holds irreducible noise; a 5% drop on fixed draws is a real signal
    assert after < 0.95 * before, (before, after)

    short = TrainConfig(steps=8, grad_accum=2, lr=5e-2, checkpoint_every=3)
    train(subject, tmp_path / "a", short, trust=UNSIGNED_OK, base_pack=base)
    steps = []
    stopped = train(subject, tmp_path / "b", short, trust=UNSIGNED_OK, base_pack=base,
                    on_event=lambda e: steps.append(e["step"]) if e["type"] == "progress" else None,
                    should_stop=lambda: len(steps) >= 5)
    assert stopped["stopped"] and stopped["steps"] == 5
    resumed = train(subject, tmp_path / "b", TrainConfig(**{**short.__dict__, "resume": True}), trust=UNSIGNED_OK,
                    base_pack=base)
    assert resumed["steps"] == 8
    a, _ = read_adapter(tmp_path / "a")
    b, _ = read_adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_a_quantized_base_pack_verifies_and_its_adapter_loads_into_the_unquantized_diffusers_model(tmp_path, quant):
    generate_keypair(tmp_path / "host.key", tmp_path / "host.pub")
    base, subject = split(tmp_path, quant, signing_key=tmp_path / "host.key")
    manifest = verify_bundle(base)
    assert manifest["quant"] == quant and manifest["kind"] == "base-pack"
    plan = json.loads((subject / "manifest.json").read_text())["plan"]
    names = tiny_model("flux").family.block_names()
    with safe_open(str(base / WEIGHTS), framework="pt") as handle:
        assert handle.metadata()["quant"] == quant
        keys = set(handle.keys())
        kept_linear_weights = [f"{names[i]}.{name}.weight" for i in plan["kept"]
                               for name, m in tiny_model("flux").family.block(i).named_modules()
                               if isinstance(m, torch.nn.Linear)]
        assert kept_linear_weights and not keys & set(kept_linear_weights), "no full-precision kept Linear weight"
        assert {handle.get_slice(k).get_dtype() for k in keys if k.endswith((".weight_nf4", ".weight_int8"))} == \
            {"U8" if quant == "nf4" else "I8"}
    trust = TrustPolicy((tmp_path / "host.pub",))  # signature, content hash and every file's sha256
    train(subject, tmp_path / "out", TrainConfig(steps=4, grad_accum=1, lr=5e-2, checkpoint_every=0), trust=trust,
          base_pack=base)

    full = tiny_model("flux").family
    inputs = full.example_inputs(height=4, width=4, text_len=5)
    with torch.no_grad():
        before = full.diffusers_forward(**inputs)
    full.model.load_lora_adapter(str(tmp_path / "out"), prefix="transformer", use_safetensors=True)
    with torch.no_grad():
        after = full.diffusers_forward(**inputs)
    assert (after - before).abs().max() > 1e-4, "the adapter must change the unquantized model's output"
    tensors, _ = read_adapter(tmp_path / "out")
    loaded = {n for n, _ in full.model.named_parameters() if "lora_A" in n}
    assert len(loaded) == len([k for k in tensors if "lora_A" in k]), "every adapter key found its module"

    (tmp_path / "base" / WEIGHTS).write_bytes((tmp_path / "base" / WEIGHTS).read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError):
        verify_bundle(base)


@pytest.mark.slow
def test_quantized_reduced_forward_matches_its_dequantized_weights_and_stays_close_to_full_precision(tmp_path):
    bases = {q: split(tmp_path / q, q) for q in ("none", "int8", "nf4")}
    subject_none, base_none = bases["none"][1], bases["none"][0]
    reader = FeatureReader(subject_none, tiny_model("flux").family.prompt_cond_keys)
    entry, residuals, cond, _, _ = reader.get(0)
    outputs = {}
    for quant, (base, subject) in bases.items():
        family, plan = reduced(subject, base)
        with torch.no_grad():
            outputs[quant] = reduced_forward(family, plan, entry, residuals, cond)
            if quant != "none":  # the same model with plain nn.Linear layers holding the dequantized weights
                for name, module in list(family.model.named_modules()):
                    if isinstance(module, QuantLinear):
                        linear = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None)
                        linear.weight.data = module.dequantized(torch.float32)
                        if module.bias is not None:
                            linear.bias.data = module.bias.data
                        parent, _, child = name.rpartition(".")
                        setattr(family.model.get_submodule(parent), child, linear)
                assert torch.allclose(reduced_forward(family, plan, entry, residuals, cond), outputs[quant],
                                      atol=1e-5, rtol=1e-5), "QuantLinear computes with exactly its dequantized weight"
    assert base_none.exists()
    error = {q: ((outputs[q] - outputs["none"]).norm() / outputs["none"].norm()).item() for q in ("int8", "nf4")}
    # The tolerance is the weights' rounding error, not float noise: on the tiny model's random weights
    # int8 per channel is off by ~0.4% of a weight's norm and NF4 (16 levels per 64 weights) by ~9%;
    # the residual stream carries the entry state past every block, so the head output moves less:
    # measured 0.04% (int8) and 1.3% (NF4). The bounds leave about 5x / 4x of room; a wrong scale or
    # nibble order gives errors of order 100%. (Random weights say little about a trained model's
    # quality; that is benchmarks/quality.py's job.)
    assert error["int8"] < 0.002 and error["nf4"] < 0.05, error
    assert error["int8"] < error["nf4"], error


@pytest.mark.slow
def test_the_tensor_counter_shows_quantized_training_holds_less(tmp_path):
    peaks = {}
    for quant in ("none", "int8", "nf4"):
        base, subject = split(tmp_path / quant, quant)
        result = train(subject, tmp_path / quant / "out",
                       TrainConfig(steps=2, grad_accum=1, checkpoint_every=0, track_memory=True),
                       trust=UNSIGNED_OK, base_pack=base)
        peaks[quant] = result["peak_tensor_bytes"]
    assert peaks["nf4"] < peaks["int8"] < peaks["none"], peaks


def test_a_base_pack_of_another_quantization_is_refused_on_the_host_and_on_the_board(tmp_path):
    base_nf4, _ = split(tmp_path / "nf4", "nf4")
    base_none, subject_none = split(tmp_path / "none", "none")
    metadata = json.loads((tmp_path / "none" / "stage" / "bundle.json").read_text())
    with pytest.raises(InputError, match=r"another weight quantization \(nf4; the subject's plan: none\)"):
        build_subject_bundle(tmp_path / "none" / "stage", tmp_path / "mixed", metadata, base_nf4)
    with pytest.raises(BundleError, match=r"another weight quantization \(nf4; the subject's plan: none\)"):
        train(subject_none, tmp_path / "out", TrainConfig(steps=1), trust=UNSIGNED_OK, base_pack=base_nf4)
    a = json.loads((base_nf4 / "manifest.json").read_text())
    b = json.loads((base_none / "manifest.json").read_text())
    assert (a["quant"], b["quant"]) == ("nf4", "none") and a["content_sha256"] != b["content_sha256"]

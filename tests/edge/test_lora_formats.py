"""The adapter in every form a user loads it (equivalence tests): diffusers' loaders (the file,
the folder, a pipeline) and peft, each against the model as trained in-process (peft LoRA at its
trained alpha, alpha != rank)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from test_train import make_bundle

from blockskip.edge.lora import ADAPTER_FILE, load_adapter, lora_config_dict, read_adapter
from blockskip.edge.train import TrainConfig, train
from blockskip.host.plan import LoraSettings
from blockskip.models import Flux

ATOL = 1e-5  # fp32, outputs of magnitude ~1: the same LoRA with its scale applied in another order
EFFECT = 100 * ATOL  # the least change of the output an adapter must make for a test to mean anything
RANK, ALPHA = 4, 6.0  # alpha != rank: a loader that drops alpha scales the LoRA by 2/3


def pipeline(transformer) -> FluxPipeline:
    """A FLUX pipeline around the transformer alone (the LoRA loaders need nothing else)."""
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def _state_dict_then_transformer(transformer, folder):
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(str(folder), return_alphas=True,
                                                                return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state_dict, alphas, transformer, metadata=metadata)


def _peft(transformer, folder):
    tensors, config = read_adapter(folder)
    inject_adapter_in_model(LoraConfig(**config), transformer)
    set_peft_model_state_dict(transformer, {k.removeprefix("transformer."): v for k, v in tensors.items()})


FORMS = {
    "load_lora_adapter(file)": lambda t, d: t.load_lora_adapter(str(d / ADAPTER_FILE)),
    "load_lora_adapter(dir, prefix, use_safetensors)":
        lambda t, d: t.load_lora_adapter(str(d), prefix="transformer", use_safetensors=True),
    "load_adapter(dir)": lambda t, d: load_adapter(t, d),
    "lora_state_dict + load_lora_into_transformer": _state_dict_then_transformer,
    "pipeline.load_lora_weights(dir)": lambda t, d: pipeline(t).load_lora_weights(str(d)),
    "peft LoraConfig + set_peft_model_state_dict": _peft,
}


def output(transformer) -> torch.Tensor:
    inputs = Flux(transformer).example_inputs(height=4, width=4, seed=1)
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def train_adapter(root, n, m, scope):
    """Train on a tiny FLUX keeping blocks n .. end-m; the reference is the trainer's own final
    peft state (its checkpoint) in a full model at the trained alpha."""
    _, plan, bundle = make_bundle(root, "flux", n, m, samples=4, lora=LoraSettings(RANK, ALPHA, scope))
    out = root / "adapter"
    train(bundle, out, TrainConfig(steps=3, grad_accum=1, lr=5e-2, checkpoint_every=0))
    targets = plan["lora"]["target_modules"]
    reference = Flux.tiny(seed=0).model
    inject_adapter_in_model(LoraConfig(**lora_config_dict(RANK, ALPHA, targets)), reference)
    set_peft_model_state_dict(reference, torch.load(out / "checkpoint.pt", weights_only=True)["lora"])
    return {"dir": out, "want": output(reference), "base": output(Flux.tiny(seed=0).model)}


@pytest.fixture(scope="module")
def double_all(tmp_path_factory):
    """LoRA on attention and MLPs of the two double-stream blocks (the four single ones skipped)."""
    return train_adapter(tmp_path_factory.mktemp("double-all"), 0, 4, "all")


@pytest.fixture(scope="module")
def single_attention(tmp_path_factory):
    """LoRA on the attention of the four single-stream blocks (the two double ones skipped)."""
    return train_adapter(tmp_path_factory.mktemp("single-attention"), 2, 0, "attention")


@pytest.mark.parametrize("setup", ["double_all", "single_attention"])
@pytest.mark.parametrize("form", list(FORMS))
def test_equivalence_every_loading_form_gives_the_trained_model(request, setup, form):
    trained = request.getfixturevalue(setup)
    assert (trained["want"] - trained["base"]).abs().max() > EFFECT, "training must visibly change the output"
    transformer = Flux.tiny(seed=0).model
    FORMS[form](transformer, trained["dir"])
    torch.testing.assert_close(output(transformer), trained["want"], atol=ATOL, rtol=0)


def test_adapter_config_records_the_trained_alpha(double_all):
    about = json.loads((double_all["dir"] / "adapter_config.json").read_text())
    _, config = read_adapter(double_all["dir"])
    assert config["lora_alpha"] == config["r"] == RANK, "the file's weights carry the scale"
    assert about["trained_lora_alpha"] == ALPHA and about["lora_alpha"] == RANK

"""The adapter in every form a user loads it (equivalence tests): diffusers' loaders (the file,
the folder, a pipeline), peft, and the ComfyUI and kohya files through diffusers' own converter,
each against the model as trained in-process (peft LoRA at its trained alpha, alpha != rank)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from helpers import make_bundle

from blockskip.edge.lora import (ADAPTER_FILE, COMFY_FILE, KOHYA_FILE, load_adapter, lora_config_dict,
                                 read_adapter, save_adapter, save_comfy_formats)
from blockskip.edge.train import TrainConfig, train
from blockskip.host.bundle import TrustPolicy
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
    train(bundle, out, TrainConfig(steps=3, grad_accum=1, lr=5e-2, checkpoint_every=0, output_format="comfy"),
          trust=TrustPolicy(allow_unsigned=True))
    targets = plan.target_modules
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


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["double_all", "single_attention"])
@pytest.mark.parametrize("form", list(FORMS))
def test_equivalence_every_loading_form_gives_the_trained_model(request, setup, form):
    trained = request.getfixturevalue(setup)
    assert (trained["want"] - trained["base"]).abs().max() > EFFECT, "training must visibly change the output"
    transformer = Flux.tiny(seed=0).model
    FORMS[form](transformer, trained["dir"])
    torch.testing.assert_close(output(transformer), trained["want"], atol=ATOL, rtol=0)


def test_equivalence_kohya_file_through_diffusers_converter(double_all):
    """kohya names, fused img/txt qkv (rank 3r) split back by diffusers' converter."""
    kohya = load_file_keys(double_all["dir"] / KOHYA_FILE)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_double_blocks_1_txt_mlp_2.lora_up.weight" in kohya
    transformer = Flux.tiny(seed=0).model
    pipeline(transformer).load_lora_weights(str(double_all["dir"]), weight_name=KOHYA_FILE)
    torch.testing.assert_close(output(transformer), double_all["want"], atol=ATOL, rtol=0)


def test_equivalence_comfy_file_through_diffusers_converter(single_attention):
    """The `lora_transformer_` file (diffusers maps only its attention keys, which is all it has here)."""
    assert any(k.startswith("lora_transformer_single_transformer_blocks_") for k in
               load_file_keys(single_attention["dir"] / COMFY_FILE))
    transformer = Flux.tiny(seed=0).model
    pipeline(transformer).load_lora_weights(str(single_attention["dir"]), weight_name=COMFY_FILE)
    torch.testing.assert_close(output(transformer), single_attention["want"], atol=ATOL, rtol=0)


def load_file_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def peft_adapter(family, targets, out_dir, seed=0):
    """A non-zero peft LoRA (rank != alpha) on `targets`, injected in `family.model` (the in-process
    reference) and written as the trainer writes it, comfy and kohya files included."""
    from peft import get_peft_model_state_dict

    config = lora_config_dict(RANK, ALPHA, targets)
    family.model.add_adapter(LoraConfig(**config), adapter_name="trained")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in family.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    save_adapter(get_peft_model_state_dict(family.model, adapter_name="trained"), config, out_dir)
    save_comfy_formats(out_dir, family)


def test_equivalence_kohya_modulation_and_partial_qkv(tmp_path):
    """Every double-block module kohya names, modulation included; a qkv with LoRA on q and v only
    (k gets a zero block)."""
    family = Flux.tiny(seed=0)
    base = output(family.model)
    block = "transformer_blocks.1."
    targets = [block + name for name in ["attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                         "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                                         "norm1_context.linear"]]
    peft_adapter(family, targets, tmp_path)
    want = output(family.model)
    assert (want - base).abs().max() > EFFECT
    assert "lora_unet_double_blocks_1_img_mod_lin.alpha" in load_file_keys(tmp_path / KOHYA_FILE)
    transformer = Flux.tiny(seed=0).model
    pipeline(transformer).load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    torch.testing.assert_close(output(transformer), want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_equivalence_kohya_single_block_at_flux1_width(tmp_path):
    """diffusers' converter splits `linear1` at FLUX.1's widths (3 x 3072 + 12288), so the single
    block is checked on a one-block FLUX of that width (~180 M parameters): q, k, v into linear1
    (the MLP input gets a zero block), proj_out as linear2, the modulation."""
    family = Flux.tiny(seed=0, num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                       axes_dims_rope=(16, 56, 56))
    base = output(family.model)
    targets = [f"single_transformer_blocks.0.{name}" for name in
               ["attn.to_q", "attn.to_k", "attn.to_v", "proj_out", "norm.linear"]]
    peft_adapter(family, targets, tmp_path)
    want = output(family.model)
    assert (want - base).abs().max() > EFFECT
    family.model.unload_lora()  # back to the base weights; the loader under test starts from them
    torch.testing.assert_close(output(family.model), base, atol=0, rtol=0)
    pipeline(family.model).load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    torch.testing.assert_close(output(family.model), want, atol=ATOL, rtol=0)


def test_adapter_config_records_the_trained_alpha(double_all):
    about = json.loads((double_all["dir"] / "adapter_config.json").read_text())
    _, config = read_adapter(double_all["dir"])
    assert config["lora_alpha"] == config["r"] == RANK, "the file's weights carry the scale"
    assert about["trained_lora_alpha"] == ALPHA and about["lora_alpha"] == RANK

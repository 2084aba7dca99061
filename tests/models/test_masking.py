"""Image-query -> text-key masking, the switch behind the sensitivity profile."""

import pytest
import torch

from blockskip.models import Flux


@pytest.mark.slow
def test_masking_one_block_changes_output_in_every_block(family):
    inputs = family.example_inputs(seed=5)
    with torch.no_grad():
        base = family.forward(**inputs)
        for index in range(family.num_blocks):
            with family.mask_text_attention([index]):
                masked = family.forward(**inputs)
                masked_diffusers = family.diffusers_forward(**inputs)
            assert (masked - base).abs().max() > 1e-6, f"masking block {index} changed nothing"
            assert torch.allclose(masked, masked_diffusers, atol=1e-5), "the switch must act on diffusers' forward too"
        assert torch.equal(family.forward(**inputs), base), "leaving the context must restore the model"


def test_masking_every_flux_block_removes_text_influence():
    flux = Flux.tiny(seed=1)
    a = flux.example_inputs(seed=6)
    b = dict(a, encoder_hidden_states=torch.randn_like(a["encoder_hidden_states"]))
    everything = range(flux.num_blocks)
    with torch.no_grad():
        assert (flux.forward(**a) - flux.forward(**b)).abs().max() > 1e-3, "text must matter unmasked"
        with flux.mask_text_attention(everything):
            out_a, out_b = flux.forward(**a), flux.forward(**b)
    assert (out_a - out_b).abs().max() < 1e-6


def test_masking_every_sana_block_removes_text_influence(sana):
    a = sana.example_inputs(seed=7)
    b = dict(a, encoder_hidden_states=torch.randn_like(a["encoder_hidden_states"]))
    with torch.no_grad(), sana.mask_text_attention(range(sana.num_blocks)):
        assert (sana.forward(**a) - sana.forward(**b)).abs().max() < 1e-6

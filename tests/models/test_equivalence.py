"""The backbone: the decomposed and the cached-feature forwards equal diffusers' own forward."""

import pytest
import torch

from blockskip.models import Flux
from blockskip.models.skip import SkipPlan, compute_features, reduced_forward

TOL = 1e-5


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_equivalence_decomposition_matches_diffusers(family):
    inputs = family.example_inputs(batch=2, height=6, width=4, text_len=7, seed=1)
    with torch.no_grad():
        ours = family.forward(**inputs)
        theirs = family.diffusers_forward(**inputs)
    assert ours.shape == theirs.shape
    assert theirs.abs().mean() > 1e-2, "tiny model output is degenerate; the comparison proves nothing"
    assert max_diff(ours, theirs) < TOL


def test_equivalence_sana_with_caption_mask(sana):
    inputs = sana.example_inputs(batch=2, text_len=6, seed=2)
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert max_diff(sana.forward(**inputs), sana.diffusers_forward(**inputs)) < TOL


FLUX_PLANS = [(0, 1), (1, 0), (2, 0), (2, 2), (3, 1), (1, 4), (0, 5)]  # tiny FLUX: 2 double + 4 single
SANA_PLANS = [(0, 1), (1, 0), (2, 2), (3, 2), (5, 0), (1, 3)]


@pytest.mark.parametrize("n,m", FLUX_PLANS)
def test_equivalence_cached_forward_flux(flux, n, m):
    _check_cached_equals_full(flux, SkipPlan.first_last(flux.num_blocks, n, m))


@pytest.mark.parametrize("n,m", SANA_PLANS)
def test_equivalence_cached_forward_sana(sana, n, m):
    _check_cached_equals_full(sana, SkipPlan.first_last(sana.num_blocks, n, m))


@pytest.mark.parametrize("skipped", [[1, 2], [2, 3, 4], [0, 2, 5]])
def test_equivalence_cached_forward_middle_spans(family, skipped):
    """HollowedNet-style and scattered plans: middle spans carry residuals of every stream."""
    _check_cached_equals_full(family, SkipPlan.from_blocks(family.num_blocks, skipped))


def test_equivalence_cached_forward_all_double_blocks_skipped():
    """n spanning all of FLUX's double-stream blocks at a larger depth too."""
    flux = Flux.tiny(num_layers=3, num_single_layers=3)
    for n, m in [(3, 0), (3, 2), (4, 1)]:
        _check_cached_equals_full(flux, SkipPlan.first_last(flux.num_blocks, n, m))


def _check_cached_equals_full(family, plan):
    inputs = family.example_inputs(batch=2, height=4, width=6, text_len=5, seed=3)
    entry, residuals, cond, _ = compute_features(family, plan, inputs)
    assert set(residuals) == set(plan.residual_spans)
    with torch.no_grad():
        full = family.diffusers_forward(**inputs)
        cached = reduced_forward(family, plan, entry, residuals, cond)
    assert max_diff(cached, full) < TOL, plan


def test_cached_forward_never_runs_skipped_blocks(flux):
    plan = SkipPlan.first_last(flux.num_blocks, 2, 2)
    inputs = flux.example_inputs(seed=4)
    entry, residuals, cond, _ = compute_features(flux, plan, inputs)
    ran = []
    hooks = [flux.block(i).register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i in range(flux.num_blocks)]
    with torch.no_grad():
        reduced_forward(flux, plan, entry, residuals, cond)
    for h in hooks:
        h.remove()
    assert ran == plan.kept == [2, 3]


def test_final_span_stores_image_tokens_only(flux):
    plan = SkipPlan.from_blocks(flux.num_blocks, [1, 5])
    entry, residuals, _, _ = compute_features(flux, plan, flux.example_inputs())
    assert set(residuals[(1, 2)]) == {"hidden_states", "encoder_hidden_states"}
    assert set(residuals[(5, 6)]) == {"hidden_states"}
    assert set(entry) == {"hidden_states", "encoder_hidden_states"}

import json

import pytest
import torch

from blockskip.errors import ConfigError, InputError
from blockskip.models import Flux, Sana, family_class
from blockskip.models.skip import SkipPlan


def test_flux_block_index_space_spans_both_kinds(flux):
    names = flux.block_names()
    assert names[:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert names[2:] == [f"single_transformer_blocks.{i}" for i in range(4)]
    assert flux.block(2) is flux.model.single_transformer_blocks[0]


def test_lora_targets_are_real_linear_modules(family):
    modules = dict(family.model.named_modules())
    for index in range(family.num_blocks):
        for scope in ("attention", "all"):
            targets = family.lora_targets(index, scope)
            assert targets and all(t.startswith(family.block_names()[index] + ".") for t in targets)
            for name in targets:
                assert isinstance(modules[name], (torch.nn.Linear, torch.nn.Conv2d)), name


def test_from_pretrained_reads_local_directory(tmp_path, family):
    family.model.save_pretrained(tmp_path / "transformer")
    loaded = type(family).from_pretrained(str(tmp_path))
    saved = family.model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.model.state_dict().items())
    inputs = family.example_inputs()
    with torch.no_grad():  # same weights; the CPU kernels may differ in the last bits (memory-mapped tensors)
        torch.testing.assert_close(loaded.forward(**inputs), family.forward(**inputs), rtol=1e-5, atol=1e-6)
    assert loaded.config_hash() == family.config_hash()


def test_from_pretrained_missing_directory_is_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Flux.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="config.json"):
        Flux.from_pretrained(str(tmp_path))


def test_unknown_family_names_known_ones():
    with pytest.raises(ConfigError, match="flux, sana"):
        family_class("unet")
    assert family_class("sana") is Sana


@pytest.mark.parametrize("args,match", [((6, 6, 0), "at least one"), ((6, 3, 3), "at least one"),
                                        ((6, -1, 0), ">= 0")])
def test_infeasible_plans_are_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        SkipPlan.first_last(*args)


def test_plan_segments_and_roundtrip():
    plan = SkipPlan.first_last(57, 7, 10)
    assert plan.kept == list(range(7, 47))
    assert list(plan.segments()) == [("run", 7, 47), ("skip", 47, 57)]
    assert SkipPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(ConfigError):
        SkipPlan(6, ((0, 2), (1, 3)))

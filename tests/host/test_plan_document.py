"""The plan document: a typed, versioned file whose every reader gets the same checks, and whose
errors name the field that is wrong (what a user who edited plan.json by hand needs to see)."""

from __future__ import annotations

import json
import subprocess

import pytest

from blockskip.errors import InputError
from blockskip.models.pipeline import tiny_model
from blockskip.plan import PLAN_VERSION, PlanDocument
from helpers import plan_for, subject_images


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model = tiny_model("flux")
    folder = tmp_path_factory.mktemp("plan")
    return model, plan_for(model, 2, 1).save(folder / "plan.json")


def test_a_saved_plan_loads_as_the_same_document(written):
    model, path = written
    data = json.loads(path.read_text())
    assert (data["kind"], data["version"]) == ("blockskip-plan", PLAN_VERSION)
    loaded = PlanDocument.load(path)
    assert loaded.to_dict() == data
    assert loaded.kept == list(range(2, model.family.num_blocks - 1))
    assert loaded.config_hash == model.family.config_hash()


def test_a_plan_from_before_the_version_field_is_read_as_version_1(written, tmp_path):
    _, path = written
    data = json.loads(path.read_text())
    del data["version"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    assert PlanDocument.load(old).to_dict() == {**data, "version": 1}


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("samples"), "'samples' is missing"),
    (lambda d: d.update(samples="many"), "'samples' must be int"),
    (lambda d: d.update(samples=0), "'samples' must be >= 1"),
    (lambda d: d["lora"].pop("target_modules"), "'lora.target_modules' is missing"),
    (lambda d: d["lora"].update(rank=0), "field 'lora': lora rank must be >= 1"),
    (lambda d: d["plan"].update(skipped=[[0, 99]]), "field 'plan': skipped span [0, 99)"),
    (lambda d: d["patch_schedule"].update(s_min=7), "field 'patch_schedule': s_min must be a multiple"),
    (lambda d: d["estimates"].pop("cache_bytes"), "'estimates.cache_bytes' is missing"),
    (lambda d: d.update(feature_dtype="fp64"), "'feature_dtype' must be one of fp32"),
    (lambda d: d.update(quant="int3"), "'quant' must be one of none, int8, nf4"),
    (lambda d: d["model"].pop("config_hash"), "'model.config_hash' is missing"),
    (lambda d: d.update(board=[1]), "'board' must be an object"),
])
def test_a_hand_edited_plan_names_the_wrong_field(written, tmp_path, edit, field):
    _, path = written
    data = json.loads(path.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        PlanDocument.load(bad)
    assert field in str(err.value) and str(bad) in str(err.value)


@pytest.mark.parametrize("content, says", [
    ('{"kind": "blockskip-plan", "version": 99}', "version 99 plan; this blockskip reads up to version 1"),
    ('{"kind": "blockskip-profile"}', "is not a blockskip plan"),
    ("[1, 2]", "is not a blockskip plan"),
    ("{not json", "is not JSON"),
])
def test_a_newer_or_foreign_file_is_refused_with_what_to_do(tmp_path, content, says):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(InputError, match=says.replace("(", r"\(")):
        PlanDocument.load(path)


@pytest.mark.slow
def test_cache_refuses_a_broken_plan_on_the_command_line_naming_the_field(written, tmp_path):
    """The CLI's path: exit 2 and one line naming the field, before any model is loaded."""
    _, path = written
    data = json.loads(path.read_text())
    data["patch_schedule"]["schedule"] = "sideways"
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(data))
    images = subject_images(tmp_path / "photos")[0].parent
    result = subprocess.run(["blockskip", "cache", "--model", "tiny-flux", "--plan", str(bad), "--images",
                             str(images), "--prompt", "sks", "--out", str(tmp_path / "stage")],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "field 'patch_schedule': schedule must be one of" in result.stderr
    assert "Traceback" not in result.stderr

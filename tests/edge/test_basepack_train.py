"""Training a subject bundle on the board: its base pack found by hash, the same adapter as the
single bundle, and every base pack that is missing, another one, or not a base pack refused with
the hash it needs. (The trust policy's attacks on the base pack: tests/edge/test_trust.py.)"""

import json
import shutil

import pytest
import torch

from blockskip.cli import main
from blockskip.edge.lora import read_adapter
from blockskip.edge.train import TrainConfig, train
from blockskip.errors import BundleError
from blockskip.host.basepack import build_base_pack, build_subject_bundle
from blockskip.host.bundle import TrustPolicy
from helpers import make_bundle

ADAPTER = "pytorch_lora_weights.safetensors"
UNSIGNED_OK = TrustPolicy(allow_unsigned=True)  # signatures: tests/edge/test_trust.py
CONFIG = TrainConfig(steps=3, grad_accum=2, lr=5e-2, checkpoint_every=0)


def split(root, name="flux", n=2, m=1):
    """(single bundle, base pack, subject bundle) from one cache staging folder."""
    _, _, single = make_bundle(root, name, n, m, samples=4)
    metadata = json.loads((root / "stage" / "bundle.json").read_text())
    base = build_base_pack(root / "stage", root / "base", metadata)
    return single, base, build_subject_bundle(root / "stage", root / "subject", metadata, base)


def content_hash(folder):
    return json.loads((folder / "manifest.json").read_text())["content_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "sana"])
def test_subject_bundle_trains_bit_for_bit_the_adapter_of_the_single_bundle(tmp_path, name):
    single, base, subject = split(tmp_path, name)
    train(single, tmp_path / "from-single", CONFIG, trust=UNSIGNED_OK)
    seen = []

    def locks(event):
        if event["type"] == "progress":
            seen.append(((tmp_path / "base.inuse").exists(), (tmp_path / "subject.inuse").exists()))

    train(subject, tmp_path / "from-subject", CONFIG, on_event=locks, trust=UNSIGNED_OK, base_pack=base)
    a, _ = read_adapter(tmp_path / "from-single")
    b, _ = read_adapter(tmp_path / "from-subject")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same weights, same features"
    assert (json.loads((tmp_path / "from-single" / "losses.json").read_text())
            == json.loads((tmp_path / "from-subject" / "losses.json").read_text()))
    about = json.loads((tmp_path / "from-subject" / "adapter_config.json").read_text())
    assert about["base_pack"] == content_hash(base) and about["bundle"] == content_hash(subject)
    # while training, `blockskip deploy` sees both in use; after it, neither
    assert seen and all(seen_ == (True, True) for seen_ in seen)
    assert not (tmp_path / "base.inuse").exists() and not (tmp_path / "subject.inuse").exists()


def test_the_base_pack_is_found_by_hash_among_installed_ones_also_as_a_tar(tmp_path):
    _, base, subject = split(tmp_path / "a")
    _, other, _ = split(tmp_path / "b", n=1, m=1)
    installed = tmp_path / "base-packs"
    installed.mkdir()
    shutil.copytree(other, installed / "flux-other")
    from blockskip.host.bundle import _write_tar

    _write_tar(base, installed / "flux-a.tar", sorted(json.loads((base / "manifest.json").read_text())["files"]))
    result = train(subject, tmp_path / "out", CONFIG, trust=UNSIGNED_OK, base_pack=installed)
    assert result["steps"] == 3 and (tmp_path / "out" / ADAPTER).is_file()
    assert content_hash(installed / "flux-a") == content_hash(base), "the tar was unpacked beside itself and used"


@pytest.mark.parametrize("other", ["another plan", "another model"])
def test_a_subject_bundle_against_another_base_pack_is_refused_naming_both_hashes(tmp_path, other):
    _, base, subject = split(tmp_path / "a")
    _, wrong, _ = split(tmp_path / "b", n=1, m=1) if other == "another plan" else split(tmp_path / "b", "sana", 1, 1)
    wanted, got = content_hash(base), content_hash(wrong)
    with pytest.raises(BundleError) as direct:
        train(subject, tmp_path / "out", CONFIG, trust=UNSIGNED_OK, base_pack=wrong)
    message = str(direct.value)
    assert f"needs base pack {wanted}" in message and f"is base pack {got}" in message and other in message
    installed = tmp_path / "base-packs"
    installed.mkdir()
    shutil.copytree(wrong, installed / "wrong")
    with pytest.raises(BundleError) as searched:
        train(subject, tmp_path / "out", CONFIG, trust=UNSIGNED_OK, base_pack=installed)
    message = str(searched.value)
    assert f"needs base pack {wanted}" in message and "not installed" in message and str(installed) in message
    assert f"wrong: base pack {got[:16]}" in message and other in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"


def test_a_missing_base_pack_is_refused_naming_the_hash_and_where_it_looked(tmp_path):
    _, base, subject = split(tmp_path)
    wanted = content_hash(base)
    with pytest.raises(BundleError, match=f"needs base pack {wanted} .*--base-pack PATH"):
        train(subject, tmp_path / "out", CONFIG, trust=UNSIGNED_OK)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a base pack")
    for where, what in ((tmp_path / "nowhere", "it does not exist"), (tmp_path / "empty", "no base packs there"),
                        (tmp_path / "a-file", "not a folder or a base pack")):
        with pytest.raises(BundleError) as err:
            train(subject, tmp_path / "out", CONFIG, trust=UNSIGNED_OK, base_pack=where)
        assert f"needs base pack {wanted}" in str(err.value) and f"looked in {where} ({what})" in str(err.value)
    assert not (tmp_path / "out" / ADAPTER).exists()


def test_a_base_pack_given_as_the_bundle_is_refused_with_what_to_do(tmp_path):
    _, base, _ = split(tmp_path)
    with pytest.raises(BundleError, match="is a base pack .*not a subject bundle"):
        train(base, tmp_path / "out", CONFIG, trust=UNSIGNED_OK)


def test_cli_train_takes_the_base_pack_and_says_which_it_needs(tmp_path, capsys):
    _, base, subject = split(tmp_path)
    common = ["train", str(subject), "--steps", "1", "--checkpoint-every", "0", "--allow-unsigned"]
    assert main([*common, "--out", str(tmp_path / "no")]) == 2
    assert f"needs base pack {content_hash(base)}" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "yes"), "--base-pack", str(tmp_path)]) == 0
    assert (tmp_path / "yes" / ADAPTER).is_file()

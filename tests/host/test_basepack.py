"""Base pack + subject bundle on the host: what each holds, both verified (checksums and
signature), a base pack that does not fit the staging refused, the single form converted, and
what `blockskip bundle` / `verify` print."""

import json
import shutil

import pytest
from safetensors import safe_open

from blockskip.cli import main as cli_main
from blockskip.errors import BundleError, ConfigError, InputError
from blockskip.features import WEIGHTS_FILE
from blockskip.host.basepack import build_base_pack, build_subject_bundle
from blockskip.host.bundle import build_bundle, generate_keypair, verify_bundle
from blockskip.host.cache import build_cache
from blockskip.models.pipeline import tiny_model
from helpers import plan_for, subject_images


def stage(root, n=2, m=1, seed=0, name="flux"):
    model = tiny_model(name, seed=seed)
    out = build_cache(model, plan_for(model, n, m, samples=4), subject_images(root / "images", 2), ["sks"],
                      root / "stage", bank_prompts=["a photo of sks leaf"], shard_size=2, progress=False)
    return out, json.loads((out / "bundle.json").read_text())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("basepack")
    generate_keypair(root / "host.key", root / "host.pub")
    generate_keypair(root / "other.key", root / "other.pub")
    stage(root / "a")
    stage(root / "other-plan", n=1, m=1)
    stage(root / "other-weights", seed=1)
    stage(root / "sana", name="sana")
    return root


def split(made, tmp_path, which="a", key="host"):
    staging = made / which / "stage"
    metadata = json.loads((staging / "bundle.json").read_text())
    signing = made / f"{key}.key" if key else None
    base = build_base_pack(staging, tmp_path / f"{which}.base", metadata, signing_key=signing)
    subject = build_subject_bundle(staging, tmp_path / f"{which}.subject", metadata, base, signing_key=signing)
    return base, subject


@pytest.mark.slow
def test_base_pack_holds_the_weights_and_the_subject_bundle_everything_else(made, tmp_path):
    base, subject = split(made, tmp_path)
    pub = made / "host.pub"
    base_manifest = verify_bundle(base, public_key=pub, require_signature=True)
    subject_manifest = verify_bundle(subject, public_key=pub, require_signature=True)
    assert base_manifest["kind"] == "base-pack" and subject_manifest["kind"] == "subject"
    assert base_manifest["format_version"] == subject_manifest["format_version"] == 2
    assert sorted(base_manifest["files"]) == [WEIGHTS_FILE]
    staged = sorted(p.relative_to(made / "a" / "stage").as_posix() for p in (made / "a" / "stage").rglob("*")
                    if p.is_file())
    assert sorted(subject_manifest["files"]) == [rel for rel in staged if rel != WEIGHTS_FILE]
    assert any(rel.startswith("prompts/bank") for rel in subject_manifest["files"])
    # the base pack: model, plan and precision of the weights, nothing of the subject
    assert base_manifest["model"] == {"family": "flux", "config_hash": subject_manifest["model"]["config_hash"]}
    assert base_manifest["plan"]["kept"] == subject_manifest["plan"]["kept"] == [2, 3, 4]
    assert base_manifest["precision"] == "fp32" and "train_prompts" not in base_manifest
    assert base_manifest["transformer_config"] == subject_manifest["transformer_config"]
    # the subject names its base pack by content hash, and the weights it was cached with
    ref = subject_manifest["base_pack"]
    assert ref["content_sha256"] == base_manifest["content_sha256"]
    assert ref["weights_sha256"] == base_manifest["files"][WEIGHTS_FILE]["sha256"]
    assert (base / WEIGHTS_FILE).read_bytes() == (made / "a" / "stage" / WEIGHTS_FILE).read_bytes()
    assert not (subject / "weights").exists()


@pytest.mark.parametrize("artifact, rel", [("base", WEIGHTS_FILE), ("base", "manifest.json"),
                                           ("subject", "features/shard-00000.safetensors"),
                                           ("subject", "bundle.json"), ("subject", "manifest.json")])
def test_one_flipped_byte_in_either_artifact_fails_verification(made, tmp_path, artifact, rel):
    base, subject = split(made, tmp_path)
    folder = base if artifact == "base" else subject
    data = bytearray((folder / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / rel).write_bytes(bytes(data))
    expected = "signature does not verify" if rel == "manifest.json" else f"{rel}: sha256 mismatch"
    with pytest.raises(BundleError, match=expected):
        verify_bundle(folder, public_key=made / "host.pub")


@pytest.mark.parametrize("which, reason", [("other-plan", "another plan (kept blocks 1-4; the subject's: 2-4)"),
                                           ("other-weights", "other weights of the same architecture and plan"),
                                           ("sana", "another model (sana ")])
def test_a_base_pack_that_does_not_fit_the_staging_is_refused_on_the_host(made, tmp_path, which, reason):
    base, _ = split(made, tmp_path, which)
    staging = made / "a" / "stage"
    with pytest.raises(InputError) as err:
        build_subject_bundle(staging, tmp_path / "subject", json.loads((staging / "bundle.json").read_text()), base)
    assert f"base pack {base}" in str(err.value) and reason in str(err.value) and "--base-pack-out" in str(err.value)
    assert not (tmp_path / "subject").exists()


def test_a_single_bundle_splits_into_the_same_two_artifacts(made, tmp_path):
    staging = made / "a" / "stage"
    metadata = json.loads((staging / "bundle.json").read_text())
    single = build_bundle(staging, tmp_path / "single", metadata)
    assert verify_bundle(single)["format_version"] == 1 and "kind" not in verify_bundle(single)
    base = build_base_pack(single, tmp_path / "base", metadata)
    subject = build_subject_bundle(single, tmp_path / "subject", metadata, base)
    for rel, entry in verify_bundle(single)["files"].items():
        holder = base if rel == WEIGHTS_FILE else subject
        assert verify_bundle(holder)["files"][rel] == entry, rel
    with pytest.raises(InputError, match="is already a subject bundle"):
        build_base_pack(subject, tmp_path / "again", metadata)
    (single / "features" / "shard-00001.safetensors").write_bytes(b"changed")
    with pytest.raises(BundleError, match="shard-00001.safetensors: size mismatch"):
        build_base_pack(single, tmp_path / "from-broken", metadata)


def test_the_base_pack_records_the_storage_precision(made, tmp_path):
    staging = tmp_path / "stage"
    shutil.copytree(made / "a" / "stage", staging)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(staging / WEIGHTS_FILE))
    save_file({k: v.bfloat16() for k, v in weights.items()}, str(staging / WEIGHTS_FILE))
    base = build_base_pack(staging, tmp_path / "base", json.loads((staging / "bundle.json").read_text()))
    assert verify_bundle(base)["precision"] == "bf16"
    with safe_open(str(base / WEIGHTS_FILE), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}


def test_bundle_kinds_and_versions_are_checked(made, tmp_path):
    staging = made / "a" / "stage"
    with pytest.raises(ConfigError, match="kind 'blockskip-plan' is not a bundle kind"):
        build_bundle(staging, tmp_path / "b", {"kind": "blockskip-plan"})
    base, _ = split(made, tmp_path, key=None)
    from blockskip.host import bundle as bundle_mod

    manifest = json.loads((base / "manifest.json").read_text())
    for change, message in (({"format_version": 3}, "format_version 3 is not supported"),
                            ({"kind": "palette"}, "kind 'palette' is not known")):
        edited = {**manifest, **change}
        edited["content_sha256"] = bundle_mod._content_sha256(edited)
        (base / "manifest.json").write_bytes(bundle_mod._canonical(edited))
        with pytest.raises(BundleError, match=message):
            verify_bundle(base)


def test_cli_bundle_writes_both_prints_both_sizes_and_reuses_the_base_pack(made, tmp_path, capsys):
    staging = made / "a" / "stage"
    assert cli_main(["bundle", str(staging), "--out", str(tmp_path / "s1")]) == 2
    err = capsys.readouterr().err
    assert "--base-pack-out BASE" in err and "--base-pack BASE" in err and "--single" in err
    assert not (tmp_path / "s1").exists()

    assert cli_main(["bundle", str(staging), "--base-pack-out", str(tmp_path / "base"), "--out", str(tmp_path / "s1"),
                     "--sign", str(made / "host.key"), "--tar"]) == 0
    out = capsys.readouterr().out
    base_size = verify_bundle(tmp_path / "base")["files"][WEIGHTS_FILE]["size"]
    subject_size = sum(e["size"] for e in verify_bundle(tmp_path / "s1")["files"].values())
    assert f"wrote base pack {tmp_path / 'base'}: 1 file, {base_size / 1024:.1f} KiB, signed with ed25519:" in out
    assert f"wrote subject bundle {tmp_path / 's1'}: " in out and f"{subject_size / 1024:.1f} KiB" in out
    assert (tmp_path / "base.tar").is_file() and (tmp_path / "s1.tar").is_file()
    base_hash = verify_bundle(tmp_path / "base")["content_sha256"]

    # the next subject names the same base pack (here its tar); the base pack is not written again
    assert cli_main(["bundle", str(staging), "--base-pack", str(tmp_path / "base.tar"), "--out", str(tmp_path / "s2"),
                     "--sign", str(made / "host.key")]) == 0
    out = capsys.readouterr().out
    assert f"needs base pack {base_hash[:16]}" in out and "not rewritten" in out
    assert verify_bundle(tmp_path / "s2")["base_pack"]["content_sha256"] == base_hash

    assert cli_main(["verify", str(tmp_path / "base"), "--key", str(made / "host.pub"), "--require-signature"]) == 0
    assert f"base pack {base_hash} (flux " in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "s2"), "--key", str(made / "host.pub")]) == 0
    assert f"subject bundle for base pack {base_hash}" in capsys.readouterr().out

    assert cli_main(["bundle", str(staging), "--single", "--out", str(tmp_path / "single")]) == 0
    assert "wrote single bundle" in capsys.readouterr().out
    assert cli_main(["bundle", str(staging), "--base-pack", str(tmp_path / "single"), "--out",
                     str(tmp_path / "s3")]) == 2
    assert "is not a base pack" in capsys.readouterr().err


def test_the_plans_base_pack_estimate_is_what_the_base_pack_holds(made, tmp_path):
    model = tiny_model("flux")
    estimate = plan_for(model, 2, 1).estimates["base_pack_bytes"]
    base, _ = split(made, tmp_path)
    with safe_open(str(base / WEIGHTS_FILE), framework="pt") as handle:
        held = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert estimate == held


def test_base_pack_descriptions_read_as_ranges():
    from blockskip import basepack as reading  # what names a base pack is the board's too

    assert reading._ranges([2, 3, 4, 7, 9, 10]) == "2-4, 7, 9-10"
    assert reading._ranges([5]) == "5"

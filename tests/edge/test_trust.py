"""The board's trust policy, attacked through every path that opens a bundle: the library call,
the `train` / `generate` / `export` command lines, and the MQTT agent; for `train` also through
the base pack a subject bundle names.

The attacks: a file changed and the manifest re-hashed (old signature kept, or deleted), an intact
bundle signed by another key, an unsigned bundle, and a folder left beside a trusted tar; on the
base pack the same, plus a weights file changed in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile

import pytest

from blockskip.cli import main
from blockskip.edge.agent import AgentConfig
from blockskip.edge.train import TrainConfig, train
from blockskip.errors import BundleError, ConfigError
from blockskip.host import bundle as bundle_mod
from blockskip.host.basepack import build_base_pack, build_subject_bundle
from blockskip.host.bundle import TrustPolicy, build_bundle, generate_keypair
from blockskip.models.pipeline import save_model, tiny_model
from helpers import make_bundle

ADAPTER = "pytorch_lora_weights.safetensors"
WEIGHTS = "weights/kept_blocks.safetensors"
BANK = "prompts/bank.safetensors"
DEV = "dev-a"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A staging folder with a prompt bank, the host's key pair and another key pair."""
    root = tmp_path_factory.mktemp("trust")
    make_bundle(root, "flux", 2, 1, samples=2)
    stage = root / "stage"
    from blockskip.prompt_bank import write_prompt_bank

    write_prompt_bank(stage, tiny_model("flux"), ["a photo of sks leaf"])
    generate_keypair(root / "host.key", root / "host.pub")
    generate_keypair(root / "other.key", root / "other.pub")
    save_model(tiny_model("flux"), root / "model")
    return root


def build(made, out, key="host", tar=False):
    metadata = json.loads((made / "stage" / "bundle.json").read_text())
    return build_bundle(made / "stage", out, metadata, signing_key=made / f"{key}.key" if key else None, tar=tar)


def rehash(bundle, rel, keep_signature=True):
    """What an attacker with write access to the bundle does: change a file, then re-hash the
    manifest so that every checksum matches again."""
    path = bundle / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["content_sha256"] = bundle_mod._content_sha256(manifest)
    (bundle / "manifest.json").write_bytes(bundle_mod._canonical(manifest))
    if not keep_signature:
        (bundle / "manifest.sig").unlink()
    return bundle


def split(made, out, base_key="host"):
    """(base pack signed with base_key, subject bundle signed with the host's key)."""
    metadata = json.loads((made / "stage" / "bundle.json").read_text())
    base = build_base_pack(made / "stage", out / "base", metadata,
                           signing_key=made / f"{base_key}.key" if base_key else None)
    return base, build_subject_bundle(made / "stage", out / "subject", metadata, base, signing_key=made / "host.key")


def flip_in_place(folder, rel):
    data = bytearray((folder / rel).read_bytes())
    data[-1] ^= 0x01
    (folder / rel).write_bytes(bytes(data))
    return folder


BASE_ATTACKS = {  # the subject bundle is intact and signed by the host; its base pack is not
    "base pack weights changed, manifest re-hashed, old signature kept":
        (lambda made, out: rehash(split(made, out)[0], WEIGHTS), "signature does not verify"),
    "base pack weights changed, manifest re-hashed, signature deleted":
        (lambda made, out: rehash(split(made, out)[0], WEIGHTS, keep_signature=False), "not signed"),
    "base pack weights changed in place":
        (lambda made, out: flip_in_place(split(made, out)[0], WEIGHTS), f"{WEIGHTS}: sha256 mismatch"),
    "intact base pack signed by another key":
        (lambda made, out: split(made, out, base_key="other")[0], "signature does not verify"),
    "unsigned base pack": (lambda made, out: split(made, out, base_key=None)[0], "not signed"),
}

ATTACKS = {
    "file changed, manifest re-hashed, old signature kept":
        (lambda made, out: rehash(build(made, out), WEIGHTS), "signature does not verify"),
    "file changed, manifest re-hashed, signature deleted":
        (lambda made, out: rehash(build(made, out), WEIGHTS, keep_signature=False), "not signed"),
    "intact bundle signed by another key":
        (lambda made, out: build(made, out, key="other"), "signature does not verify"),
    "unsigned bundle": (lambda made, out: build(made, out, key=None), "not signed"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_library_train_refuses_the_attack_and_writes_nothing(made, tmp_path, attack):
    make, message = ATTACKS[attack]
    bundle = make(made, tmp_path / "bundle")
    with pytest.raises(BundleError, match=message):
        train(bundle, tmp_path / "out", TrainConfig(steps=1, grad_accum=1), trust=TrustPolicy((made / "host.pub",)))
    assert not (tmp_path / "out" / ADAPTER).exists()


def test_library_default_policy_trusts_nothing_and_the_host_key_trains(made, tmp_path):
    bundle = build(made, tmp_path / "bundle")
    with pytest.raises(BundleError, match="no trusted public key"):
        train(bundle, tmp_path / "out", TrainConfig(steps=1, grad_accum=1))
    assert not (tmp_path / "out" / ADAPTER).exists()
    trust = TrustPolicy((made / "other.pub", made / "host.pub"))  # any one of the trusted keys
    result = train(bundle, tmp_path / "out", TrainConfig(steps=1, grad_accum=1, checkpoint_every=0), trust=trust)
    assert (tmp_path / "out" / ADAPTER).is_file() and result["steps"] == 1


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_cli_train_refuses_the_attack(made, tmp_path, capsys, attack):
    make, message = ATTACKS[attack]
    bundle = make(made, tmp_path / "bundle")
    code = main(["train", str(bundle), "--out", str(tmp_path / "out"), "--steps", "1", "--key", str(made / "host.pub")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / ADAPTER).exists()


@pytest.mark.parametrize("attack", list(BASE_ATTACKS))
def test_library_train_refuses_a_base_pack_attack_and_writes_nothing(made, tmp_path, attack):
    make, message = BASE_ATTACKS[attack]
    base = make(made, tmp_path)
    with pytest.raises(BundleError, match=message):
        train(tmp_path / "subject", tmp_path / "out", TrainConfig(steps=1, grad_accum=1),
              trust=TrustPolicy((made / "host.pub",)), base_pack=base)
    assert not (tmp_path / "out" / ADAPTER).exists()


def test_library_trains_a_subject_bundle_on_its_trusted_base_pack(made, tmp_path):
    base, subject = split(made, tmp_path)
    result = train(subject, tmp_path / "out", TrainConfig(steps=1, grad_accum=1, checkpoint_every=0),
                   trust=TrustPolicy((made / "host.pub",)), base_pack=base)
    assert (tmp_path / "out" / ADAPTER).is_file() and result["steps"] == 1


def test_unsigned_allowed_still_refuses_a_changed_base_pack_by_the_hash_the_subject_names(made, tmp_path):
    """With no signature checked, the subject bundle's content hash is what pins its base pack."""
    base = rehash(split(made, tmp_path)[0], WEIGHTS, keep_signature=False)
    with pytest.raises(BundleError, match="needs base pack .* but .* is base pack .*other weights"):
        train(tmp_path / "subject", tmp_path / "out", TrainConfig(steps=1, grad_accum=1),
              trust=TrustPolicy(allow_unsigned=True), base_pack=base)
    assert not (tmp_path / "out" / ADAPTER).exists()


@pytest.mark.parametrize("attack", list(BASE_ATTACKS))
def test_cli_train_refuses_a_base_pack_attack(made, tmp_path, capsys, attack):
    make, message = BASE_ATTACKS[attack]
    base = make(made, tmp_path)
    code = main(["train", str(tmp_path / "subject"), "--base-pack", str(base), "--out", str(tmp_path / "out"),
                 "--steps", "1", "--key", str(made / "host.pub")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / ADAPTER).exists()


def test_cli_train_applies_the_agents_trust_policy_to_the_base_pack(made, tmp_path, capsys):
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: {DEV}\ndata_dir: {tmp_path / 'data'}\ntrusted_keys: [{made / 'host.pub'}]\n")
    base, subject = split(made, tmp_path, base_key="other")  # the subject is the host's, the base pack is not
    code = main(["train", str(subject), "--base-pack", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--trust-config", str(config)])
    assert code == 2 and "signature does not verify" in capsys.readouterr().err
    assert not (tmp_path / "out" / ADAPTER).exists()


def test_cli_train_needs_a_plain_choice(made, tmp_path, capsys):
    bundle = build(made, tmp_path / "bundle", key=None)
    assert main(["train", str(bundle), "--out", str(tmp_path / "no"), "--steps", "1"]) == 2
    assert "--key" in capsys.readouterr().err and not (tmp_path / "no" / ADAPTER).exists()
    assert main(["train", str(bundle), "--out", str(tmp_path / "yes"), "--steps", "1", "--checkpoint-every", "0",
                 "--allow-unsigned"]) == 0
    assert (tmp_path / "yes" / ADAPTER).is_file()


def test_cli_train_takes_the_agents_trust_policy(made, tmp_path, capsys):
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: {DEV}\ndata_dir: {tmp_path / 'data'}\ntrusted_keys: [{made / 'other.pub'}]\n")
    bundle = build(made, tmp_path / "bundle")  # signed by host.key, which this board does not trust
    code = main(["train", str(bundle), "--out", str(tmp_path / "out"), "--steps", "1", "--trust-config", str(config)])
    assert code == 2 and "signature does not verify" in capsys.readouterr().err
    config.write_text(f"device_id: {DEV}\ndata_dir: {tmp_path / 'data'}\ntrusted_keys: [{made / 'host.pub'}]\n")
    code = main(["train", str(bundle), "--out", str(tmp_path / "out"), "--steps", "1", "--checkpoint-every", "0",
                 "--trust-config", str(config)])
    assert code == 0 and (tmp_path / "out" / ADAPTER).is_file()


def test_a_folder_beside_a_trusted_tar_is_used_only_if_it_is_the_tars_bundle(made, tmp_path):
    trust = TrustPolicy((made / "host.pub",))
    build(made, tmp_path / "maize", tar=True)
    tar_path = tmp_path / "maize.tar"
    # the folder beside the tar was re-hashed and its signature deleted: not what the tar holds
    rehash(tmp_path / "maize", WEIGHTS, keep_signature=False)
    with pytest.raises(BundleError, match="holds something other than"):
        bundle_mod.open_bundle(tar_path, trust)
    # same manifest and signature as the tar, but a file changed after the fact
    shutil.rmtree(tmp_path / "maize")
    with tarfile.open(tar_path) as archive:
        archive.extractall(tmp_path / "maize", filter="data")
    data = bytearray((tmp_path / "maize" / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (tmp_path / "maize" / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        train(tar_path, tmp_path / "out", TrainConfig(steps=1, grad_accum=1), trust=trust)
    # the real unpacked bundle is reused
    shutil.rmtree(tmp_path / "maize")
    assert bundle_mod.open_bundle(tar_path, trust) == tmp_path / "maize"


def test_cli_generate_and_export_apply_the_policy_to_the_prompt_bank(made, tmp_path, capsys):
    bundle = rehash(build(made, tmp_path / "bundle"), BANK)  # the prompt bank changed, old signature kept
    common = ["--model", str(made / "model"), "--bundle", str(bundle), "--key", str(made / "host.pub")]
    assert main(["generate", *common, "--list-prompts"]) == 2
    assert "signature does not verify" in capsys.readouterr().err
    assert main(["generate", *common, "--bank-index", "0", "--steps", "1", "--height", "16", "--width", "16",
                 "--backend", "torch", "--out", str(tmp_path / "images")]) == 2
    assert "signature does not verify" in capsys.readouterr().err and not (tmp_path / "images").exists()
    assert main(["export", *common, "--height", "16", "--width", "16", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "signature does not verify" in capsys.readouterr().err
    good = build(made, tmp_path / "good")
    assert main(["generate", "--model", str(made / "model"), "--bundle", str(good), "--key", str(made / "host.pub"),
                 "--list-prompts"]) == 0
    assert "a photo of sks leaf" in capsys.readouterr().out


def test_agent_config_refuses_a_key_it_cannot_read(tmp_path):
    with pytest.raises(ConfigError, match="trusted_keys"):
        AgentConfig(device_id=DEV, data_dir=str(tmp_path), trusted_keys=[str(tmp_path / "missing.pub")])


@pytest.mark.slow
def test_agent_trains_and_generates_only_from_trusted_bundles(made, broker, start_agent, probe_factory,
                                                              wait_until):
    agent = start_agent(trusted_keys=[str(made / "host.pub")])
    data = agent.data_dir
    shutil.copytree(made / "model", data / "model", dirs_exist_ok=True)
    for name, (make, _) in ATTACKS.items():
        make(made, data / "bundles" / name.replace(" ", "-").replace(",", ""))
    build(made, data / "bundles" / "good")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])

    def run(cid, action, args):
        assert probe.request(DEV, {"id": cid, "action": action, "args": args})["ok"]
        return wait_until(lambda: [e for e in probe.on("/progress") if e.get("job") == cid
                                   and e.get("type") in ("done", "failed", "cancelled")], 120)[-1]

    for i, name in enumerate(ATTACKS):
        bundle = "bundles/" + name.replace(" ", "-").replace(",", "")
        end = run(f"t{i}", "train", {"bundle": bundle, "out": f"adapters/t{i}", "steps": 1})
        assert end["type"] == "failed" and end["error"]["code"] == "bad_bundle", (name, end)
        assert not (data / "adapters" / f"t{i}" / ADAPTER).exists()
        end = run(f"g{i}", "generate", {"model": "model", "bundle": bundle, "prompts": ["a photo of sks leaf"],
                                         "steps": 1, "height": 16, "width": 16, "backend": "torch"})
        assert end["type"] == "failed" and end["error"]["code"] == "bad_bundle", (name, end)
    assert not probe.on("/result"), "no image from an untrusted bundle"
    end = run("good", "train", {"bundle": "bundles/good", "out": "adapters/good", "steps": 1})
    assert end["type"] == "done", end
    assert (data / "adapters" / "good" / ADAPTER).is_file()


def test_agent_with_no_trusted_key_refuses_bundles_and_says_what_to_configure(made, broker, start_agent,
                                                                             probe_factory, wait_until):
    agent = start_agent()
    build(made, agent.data_dir / "bundle")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    assert probe.request(DEV, {"id": "t", "action": "train", "args": {"bundle": "bundle", "steps": 1}})["ok"]
    end = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") in ("done", "failed")], 60)[-1]
    assert end["error"]["code"] == "bad_bundle" and "trusted_keys" in end["error"]["message"]


def test_agent_trains_a_subject_bundle_only_on_a_trusted_installed_base_pack(made, broker, start_agent, probe_factory,
                                                                            wait_until):
    agent = start_agent(trusted_keys=[str(made / "host.pub")])
    data = agent.data_dir
    installed = data / "base-packs"  # the default base_packs_dir
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])

    def run(cid):
        args = {"bundle": "work/subject", "out": f"adapters/{cid}", "steps": 1}
        assert probe.request(DEV, {"id": cid, "action": "train", "args": args})["ok"]
        return wait_until(lambda: [e for e in probe.on("/progress") if e.get("job") == cid
                                   and e.get("type") in ("done", "failed", "cancelled")], 120)[-1]

    base, _ = split(made, data / "work")
    wanted = json.loads((base / "manifest.json").read_text())["content_sha256"]
    end = run("none-installed")
    assert end["type"] == "failed" and end["error"]["code"] == "bad_bundle", end
    assert f"needs base pack {wanted}" in end["error"]["message"] and str(installed) in end["error"]["message"]
    for i, (name, (make, _)) in enumerate(BASE_ATTACKS.items()):
        shutil.rmtree(installed, ignore_errors=True)
        shutil.rmtree(data / "work", ignore_errors=True)
        installed.mkdir()
        shutil.copytree(make(made, data / "work"), installed / "flux-50")
        end = run(f"attack{i}")
        assert end["type"] == "failed" and end["error"]["code"] == "bad_bundle", (name, end)
        assert not (data / "adapters" / f"attack{i}" / ADAPTER).exists(), name
    shutil.rmtree(installed)
    shutil.rmtree(data / "work")
    base, _ = split(made, data / "work")
    installed.mkdir()
    shutil.copytree(base, installed / "flux-50")
    end = run("good")
    assert end["type"] == "done", end
    assert (data / "adapters" / "good" / ADAPTER).is_file()

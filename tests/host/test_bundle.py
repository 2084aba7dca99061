import base64
import io
import json
import os
import stat
import subprocess
import tarfile
from datetime import datetime

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockskip.cli import main as cli_main
from blockskip.errors import BundleError, ConfigError, InputError
from blockskip.host.bundle import (build_bundle, generate_keypair, load_private_key, load_public_key,
                                   TrustPolicy, open_bundle, unpack_bundle, verify_bundle)

METADATA = {"model": {"family": "flux", "config_hash": "abc123"}, "plan": {"num_blocks": 8, "skipped": [[0, 2]]},
            "patch_schedule": {"s_min": 256, "s_max": 512, "granularity": 16, "schedule": "low-to-high"},
            "lora": {"rank": 4}, "samples": 3}
STAGED = ["bundle.json", "features/shard-00000.safetensors", "features/shard-00001.safetensors",
          "plan.json", "prompts/bank.safetensors", "weights/kept_blocks.safetensors"]


def _write_staging(root):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "weights/kept_blocks.safetensors": {"transformer_blocks.2.attn.to_q.weight": torch.randn(8, 8, generator=generator)},
        "features/shard-00000.safetensors": {"hidden_states": torch.randn(2, 16, 8, generator=generator)},
        "features/shard-00001.safetensors": {"hidden_states": torch.randn(2, 16, 8, generator=generator)},
        "prompts/bank.safetensors": {"encoder_hidden_states": torch.randn(1, 4, 8, generator=generator)},
    }
    for rel, content in tensors.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(content, str(root / rel))
    (root / "bundle.json").write_text(json.dumps(METADATA))
    (root / "plan.json").write_text(json.dumps(METADATA["plan"]))
    return tensors


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "a.key", folder / "a.pub")
    generate_keypair(folder / "b.key", folder / "b.pub")
    return folder


@pytest.fixture
def staging(tmp_path):
    root = tmp_path / "staging"
    root.mkdir()
    _write_staging(root)
    return root


@pytest.fixture
def signed(staging, keys, tmp_path):
    return build_bundle(staging, tmp_path / "bundle", METADATA, signing_key=keys / "a.key", tar=True)


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip(staging, tmp_path):
    tensors = _write_staging(staging)
    out = build_bundle(staging, tmp_path / "bundle", METADATA)
    manifest = verify_bundle(out)
    assert manifest["format"] == "blockskip-bundle" and manifest["format_version"] == 1
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    assert {k: manifest[k] for k in METADATA} == METADATA
    assert sorted(manifest["files"]) == STAGED
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (staging / rel).stat().st_size and len(entry["sha256"]) == 64
    for rel, content in tensors.items():
        loaded = load_file(str(out / rel))
        assert all(torch.equal(loaded[name], value) for name, value in content.items())
    assert not (out / "manifest.sig").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "staging"]  # no leftovers, no tar


def test_signed_round_trip_and_signature_format(signed, keys):
    manifest = verify_bundle(signed, public_key=keys / "a.pub", require_signature=True)
    assert manifest["samples"] == 3
    signature = base64.b64decode((signed / "manifest.sig").read_bytes().strip(), validate=True)
    load_public_key(keys / "a.pub").verify(signature, (signed / "manifest.json").read_bytes())


@pytest.mark.parametrize("rel", STAGED + ["manifest.json", "manifest.sig"])
def test_one_flipped_byte_in_any_file_fails(signed, keys, rel):
    _flip(signed / rel)
    with pytest.raises(BundleError) as err:
        verify_bundle(signed, public_key=keys / "a.pub")
    if rel == "manifest.json":
        assert "signature does not verify with key" in str(err.value)
    elif rel == "manifest.sig":
        assert "signature does not verify with key" in str(err.value) or "manifest.sig is malformed" in str(err.value)
    else:
        assert f"{rel}: sha256 mismatch (expected " in str(err.value)


def test_every_byte_of_an_unsigned_manifest_is_protected(staging, tmp_path):
    out = build_bundle(staging, tmp_path / "bundle", METADATA)
    original = (out / "manifest.json").read_bytes()
    for offset in range(0, len(original), 7):
        _flip(out / "manifest.json", offset)
        with pytest.raises(BundleError, match="manifest.json"):
            verify_bundle(out)
        (out / "manifest.json").write_bytes(original)
    verify_bundle(out)


def test_missing_extra_resized_and_linked_files_are_named(signed, tmp_path):
    (signed / "weights/kept_blocks.safetensors").unlink()
    (signed / "extra.bin").write_bytes(b"x")
    with open(signed / "features/shard-00001.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError) as err:
        verify_bundle(signed)
    message = str(err.value)
    assert "missing file weights/kept_blocks.safetensors" in message
    assert "unexpected file extra.bin not listed in the manifest" in message
    assert "features/shard-00001.safetensors: size mismatch" in message
    outside = tmp_path / "bank-copy.safetensors"
    outside.write_bytes((signed / "prompts/bank.safetensors").read_bytes())
    (signed / "prompts/bank.safetensors").unlink()
    (signed / "prompts/bank.safetensors").symlink_to(outside)
    with pytest.raises(BundleError, match="prompts/bank.safetensors is a symbolic link"):
        verify_bundle(signed)


def test_extra_file_in_a_subfolder_is_named(signed):
    (signed / "features/shard-00002.safetensors").write_bytes(b"smuggled")
    with pytest.raises(BundleError, match="unexpected file features/shard-00002.safetensors not listed"):
        verify_bundle(signed)


def test_signature_from_another_key_and_wrong_signature(signed, keys):
    with pytest.raises(BundleError, match=r"signature does not verify with key .*b\.pub"):
        verify_bundle(signed, public_key=keys / "b.pub")
    other = load_private_key(keys / "b.key").sign((signed / "manifest.json").read_bytes())
    (signed / "manifest.sig").write_bytes(base64.b64encode(other))
    with pytest.raises(BundleError, match=r"signature does not verify with key .*a\.pub"):
        verify_bundle(signed, public_key=keys / "a.pub")
    wrong = load_private_key(keys / "a.key").sign(b"some other manifest")
    (signed / "manifest.sig").write_bytes(base64.b64encode(wrong))
    with pytest.raises(BundleError, match=r"signature does not verify with key .*a\.pub"):
        verify_bundle(signed, public_key=keys / "a.pub")
    (signed / "manifest.sig").write_bytes(b"not base64 at all!")
    with pytest.raises(BundleError, match="manifest.sig is malformed"):
        verify_bundle(signed, public_key=keys / "a.pub")


def test_unsigned_bundle_when_a_signature_is_required(staging, keys, tmp_path):
    out = build_bundle(staging, tmp_path / "bundle", METADATA)
    with pytest.raises(BundleError, match="bundle is not signed but a signature is required"):
        verify_bundle(out, public_key=keys / "a.pub", require_signature=True)
    with pytest.raises(BundleError, match="bundle is not signed, so it cannot be verified with key"):
        verify_bundle(out, public_key=keys / "a.pub")


def test_signed_bundle_requiring_a_signature_needs_the_key(signed):
    with pytest.raises(BundleError, match="no public key"):
        verify_bundle(signed, require_signature=True)
    verify_bundle(signed)  # signed but not required: checksums only


def test_refuses_to_overwrite_and_rejects_bad_metadata(staging, tmp_path):
    out = build_bundle(staging, tmp_path / "bundle", METADATA)
    with pytest.raises(InputError, match="already exists"):
        build_bundle(staging, out, METADATA)
    (staging / "late.json").write_text("{}")
    build_bundle(staging, out, METADATA, overwrite=True)
    assert "late.json" in verify_bundle(out)["files"]
    (tmp_path / "empty").mkdir()
    build_bundle(staging, tmp_path / "empty", METADATA)
    with pytest.raises(ConfigError, match="files"):
        build_bundle(staging, tmp_path / "b2", {"files": {}})
    with pytest.raises(ConfigError, match="not plain JSON"):
        build_bundle(staging, tmp_path / "b3", {"nan": float("nan")})
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


def test_staging_with_links_or_reserved_names_is_rejected(staging, tmp_path):
    (staging / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="manifest.json is reserved"):
        build_bundle(staging, tmp_path / "bundle", METADATA)
    (staging / "manifest.json").unlink()
    (staging / "link.safetensors").symlink_to(staging / "plan.json")
    with pytest.raises(InputError, match="link.safetensors is a symbolic link"):
        build_bundle(staging, tmp_path / "bundle", METADATA)


def test_tar_is_plain_ordered_and_opens(signed, keys, tmp_path):
    tar_path = signed.with_name("bundle.tar")
    with tarfile.open(tar_path) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["manifest.json", "manifest.sig"] + STAGED
    assert all(m.isreg() and m.mtime == 0 and m.uid == 0 for m in members)
    unpacked = unpack_bundle(tar_path, tmp_path / "unpacked", public_key=keys / "a.pub", require_signature=True)
    assert (unpacked / "manifest.json").read_bytes() == (signed / "manifest.json").read_bytes()
    assert verify_bundle(tar_path, public_key=keys / "a.pub")["samples"] == 3
    trust = TrustPolicy((keys / "a.pub",))
    assert open_bundle(tar_path, trust) == signed  # the sibling folder holds the same bundle: reused
    cached = open_bundle(tar_path, trust, cache_dir=tmp_path / "cache")
    assert cached == tmp_path / "cache" / "bundle" and verify_bundle(cached)
    assert open_bundle(signed, trust) == signed


def test_tampered_tar_fails_on_unpack(signed, tmp_path):
    _flip(signed / "plan.json")
    tar_path = tmp_path / "tampered.tar"
    with tarfile.open(tar_path, "w") as archive:
        for rel in ["manifest.json"] + STAGED:
            archive.add(signed / rel, arcname=rel)
    with pytest.raises(BundleError, match="plan.json: sha256 mismatch"):
        unpack_bundle(tar_path, tmp_path / "dest")
    with pytest.raises(BundleError, match="plan.json: sha256 mismatch"):
        open_bundle(tar_path, TrustPolicy(allow_unsigned=True))
    assert not (tmp_path / "tampered").exists(), "a tar that fails is not left unpacked beside it"


def _evil_tar(path, member):
    with tarfile.open(path, "w") as archive:
        good = tarfile.TarInfo("plan.json")
        good.size = 2
        archive.addfile(good, io.BytesIO(b"{}"))
        archive.addfile(member, io.BytesIO(b"evil") if member.isreg() else None)


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, reason", [
    (_member("../evil"), "'..' component"),
    (_member("features/../../evil"), "'..' component"),
    (_member("/tmp/blockskip-test-evil"), "absolute path"),
    (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink"),
    (_member("features/link", tarfile.SYMTYPE, "../../evil"), "is a symlink"),
    (_member("hard", tarfile.LNKTYPE, "plan.json"), "is a hardlink"),
    (_member("dev", tarfile.CHRTYPE), "not a regular file"),
    (_member("fifo", tarfile.FIFOTYPE), "not a regular file"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "symlink-out", "hardlink", "device", "fifo"])
def test_unsafe_tar_member_is_rejected_and_nothing_is_written(tmp_path, member, reason):
    tar_path = tmp_path / "evil.tar"
    _evil_tar(tar_path, member)
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BundleError, match=f"member '{member.name}'.*{reason}|member '{member.name}' {reason}"):
        unpack_bundle(tar_path, work / "dest")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not os.path.lexists("/tmp/blockskip-test-evil")


def test_keys_are_pem_private_0600_and_loading_errors_are_clear(keys, tmp_path):
    assert stat.S_IMODE((keys / "a.key").stat().st_mode) == 0o600
    assert (keys / "a.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (keys / "a.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(InputError, match="a.pub: not a PEM private key.*public key"):
        load_private_key(keys / "a.pub")
    with pytest.raises(InputError, match="a.key: not a PEM public key.*private key"):
        load_public_key(keys / "a.key")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(InputError, match="junk.pub: not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(InputError, match="cannot read public key .*nope.pub"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(InputError, match="already exists"):
        generate_keypair(keys / "a.key", tmp_path / "new.pub")


def test_cli_in_process_errors_exit_2(staging, tmp_path, capsys):
    (staging / "bundle.json").unlink()
    assert cli_main(["bundle", str(staging), "--single", "--out", str(tmp_path / "b")]) == 2
    assert "bundle.json does not exist" in capsys.readouterr().err
    (tmp_path / "meta.json").write_text(json.dumps(METADATA))
    assert cli_main(["bundle", str(staging), "--single", "--out", str(tmp_path / "b"),
                     "--metadata", str(tmp_path / "meta.json")]) == 0
    assert cli_main(["verify", str(tmp_path / "b"), "--require-signature"]) == 2
    assert "bundle is not signed but a signature is required" in capsys.readouterr().err


def test_cli_round_trip_subprocess(staging, tmp_path):
    """The console script end to end (each call pays the CLI's torch import, so the two verify
    calls run side by side)."""
    def blockskip(*args):
        return subprocess.Popen(["blockskip", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def finish(process):
        stdout, stderr = process.communicate(timeout=120)
        return process.returncode, stdout, stderr

    code, _, stderr = finish(blockskip("keygen", "--out", tmp_path / "host"))
    assert code == 0, stderr
    assert (tmp_path / "host.key").exists() and (tmp_path / "host.pub").exists()
    code, _, stderr = finish(blockskip("bundle", staging, "--single", "--out", tmp_path / "b", "--tar",
                                       "--sign", tmp_path / "host.key"))
    assert code == 0, stderr
    assert json.loads((tmp_path / "b/manifest.json").read_text())["samples"] == 3  # from staging/bundle.json
    _flip(tmp_path / "b/features/shard-00000.safetensors")  # the tar keeps the good bytes
    good = blockskip("verify", tmp_path / "b.tar", "--key", tmp_path / "host.pub", "--require-signature")
    bad = blockskip("verify", tmp_path / "b", "--key", tmp_path / "host.pub")
    code, stdout, stderr = finish(good)
    assert code == 0, stderr
    assert stdout.startswith(f"OK {tmp_path / 'b.tar'}: {len(STAGED)} files, ")
    code, _, stderr = finish(bad)
    assert code == 2
    assert "features/shard-00000.safetensors: sha256 mismatch" in stderr

"""The x86 side of CI's arm64 stage (.ci/arm64.sh).

    python .ci/arm64_check.py make DIR      # a tiny FLUX model, a key pair, signed bundles (fp32, NF4)
    python .ci/arm64_check.py compare DIR   # arm64 results against the x86 ones: assertions, exit 1 on a miss
    python .ci/arm64_check.py fleet DIR ROOT PORT   # the agent over MQTT: a job from `fleet submit`, its images back

`make` writes into DIR (inside the emulated root, so the board sees the same files):
model/, host.key/.pub, plan-fp32.json / plan-nf4.json, base-fp32/, base-nf4/, bundle-fp32/,
bundle-nf4/ (signed, made by `prepare`, the host's one pipeline) and a tampered copy of bundle-fp32.
The same `blockskip train` / `generate` commands then run on both sides (.ci/arm64.sh) into
DIR/x86/ and DIR/arm64/, and `compare` checks them with the tolerances below.

`fleet` is the field loop with the board in the emulated root ROOT: mosquitto as deployed
(deploy/mosquitto/mosquitto.conf: TLS, passwords, the shipped ACL) on 127.0.0.1:PORT on the x86 side
(the port install.sh was given), the board's CA, password and host.pub put where install.sh's
closing message says, the agent started as the installed systemd unit starts it (its User, Group,
WorkingDirectory, UMask, Environment and ExecStart, read from the unit; chroot stands in for
systemd, which does not run there), a host worker (`blockskip host serve`) on x86, then `blockskip
fleet submit --follow` of a train + generate job and `blockskip fleet fetch` of its images.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Measured on the emulated Cortex-A76 against x86 (.ci/arm64.sh, 2026-12-08, 10 steps, seed 0): the
# same seed gives the same draws and the same initial LoRA, but float sums run in another order in
# another ISA's kernels (oneDNN on aarch64 vs x86), so the adapters are not bit-equal: max |diff|
# 1.5e-8 (fp32) and 3.4e-8 (NF4), 8.4e-8 and 1.9e-7 of the largest weight. The tolerance is 50x that.
# Generation from the same adapter: ONNX Runtime fp32 and torch bit-equal images, int8 75.2 dB.
ADAPTER_RTOL = 1e-5  # max |arm64 - x86| / max |x86| over every LoRA tensor
PSNR_MIN = {"onnxruntime-fp32": 40.0, "onnxruntime-int8": 30.0, "torch": 40.0}


def make(out: Path) -> None:
    from blockskip.host.bundle import generate_keypair
    from blockskip.host.plan import make_plan
    from blockskip.host.prepare import PrepareSettings, prepare
    from blockskip.models.pipeline import save_model, tiny_model
    from blockskip.plan import LoraSettings, PatchSchedule

    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model("flux", seed=0)
    save_model(model, out / "model")
    generate_keypair(out / "host.key", out / "host.pub")
    size = model.family.num_blocks
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.0 if i <= 2 else 9.0 for i in range(size + 1)],
               "d_suf": [0.0 if i <= 1 else 9.0 for i in range(size + 1)]}
    photos = out / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    base = (rng.random((8, 8, 3)) * 255).astype("uint8")
    for i in range(3):
        Image.fromarray(np.kron(base, np.ones((6, 6, 1), dtype="uint8"))[i:]).save(photos / f"{i}.png")
    for quant in ("fp32", "nf4"):
        plan = make_plan(profile, model, 3, PatchSchedule(s_min=16, s_max=32, granularity=model.granularity),
                         LoraSettings(rank=4, alpha=4), 8, text_len=model.text_encoder.max_length, precision="fp32",
                         quant="none" if quant == "fp32" else quant)
        plan.save(out / f"plan-{quant}.json")
        prepare(model, plan, sorted(photos.iterdir()), ["a photo of sks leaf"], out / f"bundle-{quant}",
                bank_prompts=["a photo of sks leaf on soil"], base_pack_out=out / f"base-{quant}",
                settings=PrepareSettings(signing_key=out / "host.key", overwrite=True), progress=False)
    tampered = out / "bundle-fp32-tampered"
    shutil.rmtree(tampered, ignore_errors=True)
    shutil.copytree(out / "bundle-fp32", tampered)
    shard = sorted((tampered / "features").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    print(f"x86 artifacts in {out}")


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def _psnr(a: Path, b: Path) -> float:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def compare(out: Path) -> int:
    failures, rows = [], []
    for quant in ("fp32", "nf4"):
        x86, arm = _adapter(out / "x86" / f"adapter-{quant}"), _adapter(out / "arm64" / f"adapter-{quant}")
        if x86.keys() != arm.keys():
            failures.append(f"adapter {quant}: different tensors")
            continue
        scale = max(float(t.abs().max()) for t in x86.values())
        diff = max(float((x86[k] - arm[k]).abs().max()) for k in x86)
        rows.append(f"train {quant}: max |arm64 - x86| = {diff:.3g} ({diff / scale:.3g} of the largest weight "
                    f"{scale:.3g}; tolerance {ADAPTER_RTOL:g})")
        if not diff <= ADAPTER_RTOL * scale:
            failures.append(rows[-1])
    for name, minimum in PSNR_MIN.items():
        x86_images = sorted((out / "x86" / name).glob("*.png"))
        arm_images = sorted((out / "arm64" / name).glob("*.png"))
        if not x86_images or [p.name for p in x86_images] != [p.name for p in arm_images]:
            failures.append(f"generate {name}: images differ in number or name")
            continue
        worst = min(_psnr(a, b) for a, b in zip(x86_images, arm_images))
        rows.append(f"generate {name}: lowest PSNR arm64 vs x86 {worst:.1f} dB over {len(x86_images)} images "
                    f"(minimum {minimum:g})")
        if not worst >= minimum:
            failures.append(rows[-1])
    print("\n".join(rows))
    (out / "comparison.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=2))
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


DEVICE = "ci-pi"


def _unit(root: Path) -> dict[str, list[str]]:
    """The installed unit's [Service] settings, every value of each key."""
    values: dict[str, list[str]] = {}
    text = (root / "etc/systemd/system/blockskip-agent.service").read_text()
    for line in text.split("[Service]", 1)[1].split("\n[", 1)[0].splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _in_root(root: Path, *command: str) -> None:
    subprocess.run(["chroot", str(root), *command], check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                                    "QEMU_CPU": "cortex-a76"})


def _start_agent(root: Path, log: Path) -> subprocess.Popen:
    unit = _unit(root)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "QEMU_CPU": "cortex-a76",
           "HOME": unit["WorkingDirectory"][0]}
    for setting in unit.get("Environment", []):
        for pair in shlex.split(setting):
            key, value = pair.split("=", 1)
            env[key] = value
    script = (f"cd {shlex.quote(unit['WorkingDirectory'][0])} && umask {unit['UMask'][0]} && "
              f"exec {unit['ExecStart'][0]}")
    user = f"{unit['User'][0]}:{unit['Group'][0]}"
    print(f"agent: chroot --userspec={user} ... sh -c {script!r}", flush=True)
    return subprocess.Popen(["chroot", f"--userspec={user}", str(root), "sh", "-c", script], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _online(table: str, name: str) -> bool:
    """Whether `fleet devices` / `fleet workers` lists `name` as online."""
    return any(line.split()[:2] == [name, "online"] for line in table.splitlines())


def _blockskip(*args: str, **kw) -> subprocess.CompletedProcess:
    print("$ blockskip " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.run(["blockskip", *args], text=True, **kw)


def fleet(out: Path, root: Path, port: int) -> int:
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mqtt_harness import deployed_broker, make_pki  # noqa: E402  (the tests' copy of the deployed broker)

    work = out / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    pki = make_pki(work / "pki", "blockskip ci")
    passwords = {DEVICE: "ci-pi-pass", "host-01": "host-01-pass", "operator": "operator-pass"}
    broker = deployed_broker(work / "broker", pki, passwords, port=port)
    # what install.sh's closing message asks a user to put on the board
    etc = root / "etc/blockskip"
    shutil.copy(pki / "ca.crt", etc / "ca.crt")
    (etc / "mqtt-password").write_text(passwords[DEVICE] + "\n")
    shutil.copy(out / "host.pub", etc / "host.pub")
    for name in ("ca.crt", "mqtt-password", "host.pub"):
        _in_root(root, "chown", "root:blockskip", f"/etc/blockskip/{name}")
        _in_root(root, "chmod", "0640", f"/etc/blockskip/{name}")
    # the model the board generates with (`blockskip deploy` puts it there on a real board)
    shutil.rmtree(root / "var/lib/blockskip/models", ignore_errors=True)
    shutil.copytree(out / "model", root / "var/lib/blockskip/models/tiny-flux")
    _in_root(root, "chown", "-R", "blockskip:blockskip", "/var/lib/blockskip/models")
    for name, password in passwords.items():
        (work / f"{name}.password").write_text(password + "\n")

    def broker_settings(user: str) -> dict:
        return {"host": "127.0.0.1", "port": port, "ca_file": str(pki / "ca.crt"), "username": user,
                "password_file": str(work / f"{user}.password")}

    (work / "host.yaml").write_text(yaml.safe_dump({
        "worker_id": "host-01", "work_dir": str(work / "host"), "signing_key": str(out / "host.key"),
        "broker": broker_settings("host-01"), "progress_interval_s": 5, "command_resend_s": 30,
        "device_timeout_s": 1200,
        "models": {"tiny": {"path": str(out / "model"), "board_model": "models/tiny-flux",
                            "plan": str(out / "plan-fp32.json"), "base_pack": str(out / "base-fp32"),
                            "samples": 8}}}))
    operator = work / "operator.yaml"
    operator.write_text(yaml.safe_dump({"client_id": "operator", "broker": broker_settings("operator")}))

    broker.start()
    agent = _start_agent(root, work / "agent.log")
    worker = subprocess.Popen(["blockskip", "host", "serve", "--config", str(work / "host.yaml")],
                              stdout=(work / "worker.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # the emulated agent imports torch (10-20 s) and connects
        while True:
            devices = _blockskip("fleet", "--config", str(operator), "devices", capture_output=True).stdout
            workers = _blockskip("fleet", "--config", str(operator), "workers", capture_output=True).stdout
            if _online(devices, DEVICE) and _online(workers, "host-01"):
                break
            for name, proc in (("agent", agent), ("worker", worker)):
                if proc.poll() is not None:
                    print(f"FAILED: the {name} exited ({proc.returncode}):\n" + (work / f"{name}.log").read_text()[-3000:],
                          file=sys.stderr)
                    return 1
            if time.monotonic() > deadline:
                print("FAILED: the agent or the worker never came online\n" + devices + workers, file=sys.stderr)
                return 1
            time.sleep(3)
        print(devices + workers, flush=True)
        job = "ci-arm64"
        submit = _blockskip("fleet", "--config", str(operator), "submit", "--device", DEVICE, "--model", "tiny",
                            "--subject", "a photo of sks leaf", "--prompt", "a photo of sks leaf on soil",
                            "--photos-dir", str(out / "photos"), "--steps", "10", "--gen-steps", "2",
                            "--size", "32", "--count", "2", "--seed", "0", "--job-id", job, "--follow",
                            "--timeout", "1500")
        if submit.returncode != 0:
            print(f"FAILED: the job did not finish (exit {submit.returncode})", file=sys.stderr)
            return 1
        fetched = work / "images"
        if _blockskip("fleet", "--config", str(operator), "fetch", job, "--out", str(fetched),
                      "--timeout", "300").returncode != 0:
            print("FAILED: fleet fetch", file=sys.stderr)
            return 1
        images = sorted(fetched.glob("*.png"))
        sizes = {Image.open(p).size for p in images}
        adapter = root / "var/lib/blockskip/adapters" / job / "pytorch_lora_weights.safetensors"
        print(f"agent over MQTT: {len(images)} images fetched ({sizes}); adapter on the board: {adapter.is_file()}")
        if len(images) != 2 or sizes != {(32, 32)} or not adapter.is_file():
            print("FAILED: expected 2 images of 32x32 and the job's adapter on the board", file=sys.stderr)
            return 1
        return 0
    finally:
        for proc in (worker, agent):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        for name in ("agent", "worker"):
            log = (work / f"{name}.log").read_text()
            print(f"--- {name} log (last 40 lines)\n" + "\n".join(log.splitlines()[-40:]))


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "make":
        make(folder)
        sys.exit(0)
    if command == "fleet":
        sys.exit(fleet(folder, Path(sys.argv[3]), int(sys.argv[4])))
    sys.exit(compare(folder))

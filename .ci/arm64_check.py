"""The x86 side of CI's arm64 stage (.ci/arm64.sh).

    python .ci/arm64_check.py make DIR      # a tiny FLUX model, a key pair, signed bundles (fp32, NF4)
    python .ci/arm64_check.py compare DIR   # arm64 results against the x86 ones: assertions, exit 1 on a miss

`make` writes into DIR (inside the emulated root, so the board sees the same files):
model/, host.key/.pub, plan-fp32.json / plan-nf4.json, base-fp32/, base-nf4/, bundle-fp32/,
bundle-nf4/ (signed, made by `prepare`, the host's one pipeline) and a tampered copy of bundle-fp32.
The same `blockskip train` / `generate` commands then run on both sides (.ci/arm64.sh) into
DIR/x86/ and DIR/arm64/, and `compare` checks them with the tolerances below.
"""

from __future__ import annotations

import json
import shutil
import sys
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


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "make":
        make(folder)
        sys.exit(0)
    sys.exit(compare(folder))

"""Generation memory: the boards' estimate (`blockskip.boards.generation_estimate`) against the
measured peak of tensor bytes of one image through the torch backend (fp32, one Euler step and the
latent decode), on the tiny models, the built-in crop model and a FLUX-depth proxy (19 double + 38
single blocks of width 256) with FLUX.1-dev's real VAE architecture (random weights), at two sizes.

The estimate's runtime share (imported libraries, `RUNTIME_BYTES`) is not tensor memory, so the
measured column is compared with the estimate minus it.

    python benchmarks/board_fit.py
"""

from __future__ import annotations

import argparse
import time

import torch

from blockskip.boards import RUNTIME_BYTES, generation_estimate
from blockskip.memory import TensorMemory
from blockskip.models import Flux
from blockskip.models.codec import VaeCodec
from blockskip.models.pipeline import DEFAULT_SCHEDULERS, Model, sample, tiny_model
from blockskip.models.text import HashTextEncoder
from train_memory import PROXY  # FLUX.1-dev's depth at width 256

# FLUX.1-dev's vae/config.json (AutoencoderKL, 16 latent channels)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def flux_proxy() -> Model:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    family = Flux.tiny(**PROXY)
    text = HashTextEncoder("flux", family.text_shapes(), max_length=64)
    return Model(family, VaeCodec(AutoencoderKL(**FLUX_VAE)), text, dict(DEFAULT_SCHEDULERS["flux"]))


def crop_model() -> Model:
    from blockskip.models.crops import load_crop_model

    return load_crop_model()


def measure(name: str, model: Model, size: int) -> dict:
    text_len = model.text_encoder.max_length
    text = model.encode_text("a photo of sks leaf")
    estimate = generation_estimate(model, size, size, "fp32", "torch", text_len)
    start = time.perf_counter()
    with torch.no_grad(), TensorMemory() as mem:
        sample(model, text, seed=0, steps=1, height=size, width=size)
    return {"model": name, "size": size, "measured": mem.peak_bytes, "estimate": estimate["peak_bytes"] - RUNTIME_BYTES,
            "weights": estimate["weight_bytes"], "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    torch.set_num_threads(2)
    cases = [("tiny-flux", lambda: tiny_model("flux"), (32, 64)), ("tiny-sana", lambda: tiny_model("sana"), (32, 64)),
             ("crop model", crop_model, (32, 64)), ("flux-proxy + FLUX VAE", flux_proxy, (256, 512))]
    print("| model | size | measured tensor peak MiB | estimate MiB (less runtime) | estimate / measured | "
          "weights MiB | s |")
    print("|---|---|---|---|---|---|---|")
    for name, build, sizes in cases:
        model = build()
        for size in sizes:
            r = measure(name, model, size)
            print(f"| {r['model']} | {r['size']} | {r['measured'] / 2**20:.1f} | {r['estimate'] / 2**20:.1f} | "
                  f"{r['estimate'] / r['measured']:.2f} | {r['weights'] / 2**20:.1f} | {r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

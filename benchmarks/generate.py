"""Seconds per image and peak memory of `generate` per backend, as ratios to `torch`, all
measured in the same run.

    python benchmarks/generate.py [--family flux] [--size 64] [--steps 8] [--images 3]
                                  [--backends torch,onnxruntime,tensorrt] [--model DIR]

Each backend runs in a fresh process (so its peak memory is its own): the ONNX export or engine
build happens first and is not timed, one warm-up image, then `--images` timed images. Peak
memory is the process's peak resident set (host RAM: on a Jetson that is the shared memory the
GPU uses too), plus torch's peak CUDA allocation where there is a GPU (it does not see ONNX
Runtime's or TensorRT's own allocations). Without --model a tiny model of --family is used.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import torch

    from blockskip.edge.backends import pick_backend
    from blockskip.edge.generate import sampling_model
    from blockskip.edge.onnx_export import Shapes
    from blockskip.models.pipeline import load_model, sample

    text_model = load_model(args.model, text_encoder=True)
    text = text_model.encode_text("a photo of sks maize leaf with rust, close-up")
    full = text_model if args.backend == "torch" else None
    del text_model
    model = sampling_model(args.model, full)
    shapes = Shapes(args.size, args.size, text["encoder_hidden_states"].shape[1])
    backend = pick_backend(args.backend, args.model, None, shapes, args.cache_dir, load=None)
    if args.prepare:  # export / engine build, in its own process so it is not in the peak
        return
    run = dict(text=text, steps=args.steps, height=args.size, width=args.size, predict=backend.predict)
    sample(model, seed=0, **run)  # warm-up
    start = time.perf_counter()
    for i in range(args.images):
        sample(model, seed=i + 1, **run)
    seconds = (time.perf_counter() - start) / args.images
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"backend": backend.name, "detail": backend.describe(), "s_per_image": seconds,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_cuda_torch": cuda_peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=["flux", "sana"])
    parser.add_argument("--model", help="model folder (default: a tiny model of --family)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=3, help="timed images per backend")
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt")
    parser.add_argument("--cache-dir", help="export/engine cache (default: a temporary folder)")
    parser.add_argument("--child", dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        child(args)
        return 0

    from blockskip.edge.backends import available_backends
    from blockskip.models.pipeline import save_model, tiny_model

    tmp = tempfile.TemporaryDirectory()
    args.model = args.model or str(save_model(tiny_model(args.family), Path(tmp.name) / "model"))
    args.cache_dir = args.cache_dir or str(Path(tmp.name) / "cache")
    wanted = [b for b in args.backends.split(",") if b]
    available = available_backends()
    rows = {}
    for name in wanted:
        if name not in available:
            print(f"# {name}: not available here, skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--size", str(args.size),
               "--steps", str(args.steps), "--images", str(args.images), "--cache-dir", args.cache_dir]
        if name != "torch":
            prepared = subprocess.run(cmd + ["--prepare"], capture_output=True, text=True)
            if prepared.returncode != 0:
                print(f"# {name} export failed:\n{prepared.stderr[-2000:]}", file=sys.stderr)
                continue
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"# {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    if "torch" not in rows:
        print("torch (the baseline) did not run", file=sys.stderr)
        return 1
    base = rows["torch"]
    print(f"{args.family if not args.model.startswith(tmp.name) else 'tiny ' + args.family}, "
          f"{args.size}x{args.size}, {args.steps} steps, {args.images} images per backend")
    print("| backend | where | s/image | x torch | peak RSS MiB | x torch |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        where = ",".join(row["detail"].get("providers", [])) or row["detail"].get("device", "") or "cuda"
        print(f"| {name} | {where} | {row['s_per_image']:.3f} | {row['s_per_image'] / base['s_per_image']:.2f} "
              f"| {row['peak_rss'] / 2**20:.0f} | {row['peak_rss'] / base['peak_rss']:.2f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

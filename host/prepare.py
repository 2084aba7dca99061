"""`blockskip prepare`: one subject from photos to sealed artifacts, the one host pipeline.

    photos -> cache (the frozen full model, one pass per training draw; resumable) -> bundle
    (the base pack once per model and plan, the subject bundle per subject; signed when a key is given)

The command line (`prepare`), the host worker (host/serve.py) and the demo call `prepare` with the
defaults of `PrepareSettings`; `cache` and `bundle` stay as separate commands for a host that
runs them apart (several GPUs for the cache: host/BUNDLE.md). Where the kept weights go is one of
three forms, as with `bundle`: write the base pack (`base_pack_out`, the first subject of a model
and plan), name an existing one (`base_pack`), or one self-contained bundle (`single`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from blockskip.errors import InputError
from blockskip.host.basepack import _source_files, build_base_pack, build_subject_bundle
from blockskip.host.bundle import build_bundle
from blockskip.host.cache import build_cache, list_images, read_captions
from blockskip.host.prior import PRIOR_DIR, PriorSettings, build_prior, images_dir
from blockskip.host.profile import read_prompts, require_text_encoder, resolve_model
from blockskip.plan import PlanDocument


@dataclass(frozen=True)
class PrepareSettings:
    seed: int = 0  # draws (crop, timestep, noise, prompt) of the cache
    samples: int | None = None  # unique training draws (None: the plan's)
    shard_size: int = 32  # draws per feature shard (the unit of resuming and of progress)
    feature_dtype: str | None = None  # how the features are stored (None: the plan's)
    signing_key: Path | None = None  # ed25519 private key: every artifact written is signed
    prior: PriorSettings | None = None  # class images and prior draws for prior preservation (host/prior.py)
    tar: bool = False  # also write FOLDER.tar of each artifact
    overwrite: bool = False  # replace artifacts that exist


@dataclass(frozen=True)
class Prepared:
    staging: Path  # what the cache wrote (kept: a later subject bundle or a re-seal reads it)
    subject: Path  # the subject bundle (or the single bundle)
    base_pack: Path | None  # the base pack it names (None for a single bundle)
    base_pack_written: bool
    metadata: dict  # the manifest's metadata (the staging's bundle.json with `extra` merged in)


def prepare(model, plan: PlanDocument, photos: list[Path], prompts: list[str], out: Path, *,
            staging: Path | None = None, bank_prompts: list[str] = (), base_pack: Path | None = None,
            base_pack_out: Path | None = None, single: bool = False, settings: PrepareSettings = PrepareSettings(),
            extra: dict | None = None, progress: bool = True, captions: dict[str, str] | None = None) -> Prepared:
    """Cache `photos` for `prompts` under `plan` into `staging` (default: OUT.staging), then seal the
    subject bundle `out` with its base pack: written to `base_pack_out`, or the existing `base_pack`,
    or (`single`) the weights inside. `extra` is merged into the bundle's metadata (the worker's job id).
    `captions` (photo file name -> caption) gives photos their own training prompts; `settings.prior`
    adds the class images' draws for prior preservation."""
    forms = sum(x is not None and x is not False for x in (base_pack, base_pack_out, single))
    if forms != 1:
        raise InputError("say where the kept weights go, one of: base_pack_out (write the base pack: the first "
                         "subject of this model and plan), base_pack (an existing one) or single (weights inside)")
    if base_pack is not None and not Path(base_pack).exists():
        raise InputError(f"base pack {str(base_pack)!r} does not exist (write one with --base-pack-out)")
    out = Path(out)
    staging = Path(staging) if staging is not None else out.with_name(out.name + ".staging")
    _drop_stale_prior(staging, settings.prior)
    build_cache(model, plan, list(photos), list(prompts), staging, bank_prompts=list(bank_prompts),
                seed=settings.seed, samples=settings.samples, shard_size=settings.shard_size,
                feature_dtype=settings.feature_dtype, progress=progress, captions=captions)
    shared = json.loads((staging / "bundle.json").read_text())
    if settings.prior is not None:
        shared["prior"] = build_prior(model, plan, settings.prior, staging, shared["samples"],
                                      feature_dtype=settings.feature_dtype, shard_size=settings.shard_size,
                                      progress=progress)
        (staging / "bundle.json").write_text(json.dumps(shared, indent=2))
    metadata = {**shared, **(extra or {})}
    common = dict(signing_key=settings.signing_key, tar=settings.tar, overwrite=settings.overwrite)
    if single:
        subject = build_bundle(staging, out, metadata, files=_source_files(staging), **common)
        return Prepared(staging, subject, None, False, metadata)
    written = base_pack_out is not None
    if written:
        base_pack = build_base_pack(staging, Path(base_pack_out), metadata, **common)
    subject = build_subject_bundle(staging, out, metadata, Path(base_pack), **common)
    return Prepared(staging, subject, Path(base_pack), written, metadata)


def _drop_stale_prior(staging: Path, prior: PriorSettings | None) -> None:
    """A staging folder reused with other prior settings (or none) loses the old prior draws and
    class images; the same settings resume them."""
    previous = None
    if (staging / "bundle.json").is_file():
        previous = json.loads((staging / "bundle.json").read_text()).get("prior")
    wanted = None if prior is None else asdict(prior)
    if previous is not None and wanted is not None and all(previous.get(k) == v for k, v in wanted.items()):
        return
    if previous is not None or prior is None:
        shutil.rmtree(staging / PRIOR_DIR, ignore_errors=True)
        shutil.rmtree(images_dir(staging), ignore_errors=True)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="one subject from photos to a signed bundle: cache, then bundle (host)",
        description="The host's whole per-subject job in one command: run the frozen full model over the "
                    "subject photos for the plan's training draws (what `blockskip cache` does; resumable: run it "
                    "again after an interruption), then seal the base pack and the subject bundle (what "
                    "`blockskip bundle` does). The cache stays in --staging (default: OUT.staging) for a later "
                    "re-seal. The worker (`blockskip serve`) and the demo run this same pipeline.")
    parser.add_argument("--model", required=True,
                        help="local model folder with its text encoder (diffusers pipeline layout), or tiny-flux / "
                             "tiny-sana")
    parser.add_argument("--plan", required=True, type=Path, help="plan JSON from `blockskip plan`")
    parser.add_argument("--images", required=True, type=Path, help="folder of subject photos")
    parser.add_argument("--prompt", action="append", default=[],
                        help="training prompt with the subject's identifier (repeat for several); photos with their "
                             "own caption train on it instead, so with a caption for every photo none is needed")
    parser.add_argument("--captions", type=Path, metavar="JSONL",
                        help="per-photo captions: JSON Lines of {\"file_name\": ..., \"text\": ...} (Hugging Face "
                             "imagefolder metadata.jsonl). A sidecar NAME.txt beside a photo is read too; this "
                             "file wins over it")
    parser.add_argument("--bank-prompt", action="append", default=[],
                        help="a prompt the board may generate with, encoded into the prompt bank (repeatable)")
    parser.add_argument("--bank-file", type=Path, help="text file of bank prompts, one per line")
    parser.add_argument("--out", required=True, type=Path, metavar="SUBJECT", help="subject bundle folder to create")
    form = parser.add_mutually_exclusive_group(required=True)
    form.add_argument("--base-pack-out", type=Path, metavar="BASE",
                      help="also write the base pack BASE (the first subject of this model and plan)")
    form.add_argument("--base-pack", type=Path, metavar="BASE",
                      help="an existing base pack (folder or .tar) of the same model and plan")
    form.add_argument("--single", action="store_true", help="one self-contained bundle with the weights inside")
    parser.add_argument("--staging", type=Path, help="where the cache goes (default: SUBJECT.staging)")
    parser.add_argument("--sign", type=Path, metavar="KEY", help="ed25519 private key from `blockskip keygen`")
    parser.add_argument("--tar", action="store_true", help="also write SUBJECT.tar (and BASE.tar)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing SUBJECT (BASE, and their .tar)")
    defaults = PrepareSettings()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the draws (default: %(default)s)")
    parser.add_argument("--samples", type=int, help="unique training draws (default: the plan's)")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size,
                        help="draws per feature shard (default: %(default)s)")
    prior = parser.add_argument_group(
        "prior preservation", "DreamBooth's class-prior loss, paid on the host: the frozen full model generates "
        "class images from --prior-prompt, their draws are cached like the photos' and go into the subject bundle; "
        "`blockskip train --prior-weight` mixes them in (host/prior.py)")
    prior.add_argument("--prior-prompt", metavar="TEXT",
                       help="the class prompt, without the identifier, e.g. 'a photo of a leaf' (default: no prior)")
    prior.add_argument("--prior-images", type=int, default=PriorSettings.images,
                       help="class images to generate (default: %(default)s)")
    prior.add_argument("--prior-samples", type=int,
                       help="prior draws to cache (default: as many as the subject's)")
    prior.add_argument("--prior-steps", type=int, default=PriorSettings.steps,
                       help="sampling steps per class image (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    plan = PlanDocument.load(args.plan)
    photos = list_images(args.images)
    if args.sign is not None and not args.sign.is_file():
        raise InputError(f"signing key {str(args.sign)!r} does not exist (make one with `blockskip keygen`)")
    model = resolve_model(args.model)
    require_text_encoder(model, args.model, "prepare encodes the training and prompt-bank prompts")
    bank = list(args.bank_prompt) + (read_prompts(args.bank_file) if args.bank_file else [])
    captions = read_captions(photos, args.captions)
    if not args.prompt and len(captions) < len(photos):
        raise InputError(f"{len(photos) - len(captions)} of {len(photos)} photos have no caption: give --prompt "
                         f"(the training prompt with the subject's identifier) for them")
    prior = None
    if args.prior_prompt is not None:
        prior = PriorSettings(prompt=args.prior_prompt, images=args.prior_images, samples=args.prior_samples,
                              steps=args.prior_steps, seed=args.seed)
    settings = PrepareSettings(seed=args.seed, samples=args.samples, shard_size=args.shard_size,
                               signing_key=args.sign, tar=args.tar, overwrite=args.overwrite, prior=prior)
    print(f"caching {len(photos)} photos for {plan.samples if args.samples is None else args.samples} draws "
          f"(skipping {plan.skip.num_blocks - len(plan.kept)} of {plan.skip.num_blocks} blocks)"
          + (f"; {len(captions)} with their own caption" if captions else "")
          + (f"; prior: {prior.images} class images of {prior.prompt!r}" if prior else ""))
    done = prepare(model, plan, photos, args.prompt, args.out, staging=args.staging, bank_prompts=bank,
                   base_pack=args.base_pack, base_pack_out=args.base_pack_out, single=args.single, settings=settings,
                   captions=captions)
    for label, folder in (("base pack", done.base_pack if done.base_pack_written else None),
                          ("single bundle" if args.single else "subject bundle", done.subject)):
        if folder is not None:
            files = json.loads((folder / "manifest.json").read_text())["files"]
            size = sum(entry["size"] for entry in files.values())
            print(f"wrote {label} {folder}: {len(files)} file{'s' * (len(files) != 1)}, {size / 2**20:.1f} MiB, "
                  f"{'signed' if args.sign else 'unsigned'}")
    if done.base_pack is not None and not done.base_pack_written:
        print(f"names base pack {done.base_pack} (not rewritten)")
    print(f"cache kept in {done.staging}")
    return 0

import json
import math
import random
import subprocess
import sys

import pytest

from blockskip.errors import ConfigError, InputError
from blockskip.host.encoders import EfficientNetLite0
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, choose_split, make_plan, skip_budget, split_scores
from blockskip.host.profile import masking_profile
from blockskip.models import Flux
from blockskip.models.pipeline import Model, tiny_model
from blockskip.plan import PlanDocument
from helpers import plan_for


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetLite0()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "sana"])
def test_profile_is_finite_and_covers_every_block(name, encoder):
    model = tiny_model(name)
    result = masking_profile(model, encoder, ["a leaf", "a plant on soil"], [0], steps=2, size=16, progress=False)
    n = model.family.num_blocks
    for key in ("d_pre", "d_suf"):
        values = result[key]
        assert len(values) == n + 1 and values[0] == 0.0
        assert all(math.isfinite(v) and -1e-6 <= v <= 2 for v in values)
    assert result["d_pre"][n] == pytest.approx(result["d_suf"][n]), "masking all blocks is the same either way"
    assert max(result["d_pre"][1:]) > 0, "masking must change some generation"


def test_encoder_is_the_pretrained_imagenet_model(encoder):
    import torch

    torch.manual_seed(0)
    a, b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    same = torch.nn.functional.cosine_similarity(encoder.embed(a), encoder.embed(a)).item()
    other = torch.nn.functional.cosine_similarity(encoder.embed(a), encoder.embed(-b)).item()
    assert same == pytest.approx(1.0) and other < 0.999


def test_choose_split_is_the_argmin():
    rng = random.Random(0)
    for _ in range(50):
        size = rng.randint(2, 20)
        d_pre = [0.0] + [rng.random() for _ in range(size)]
        d_suf = [0.0] + [rng.random() for _ in range(size)]
        k = rng.randint(0, size)
        n, m = choose_split(d_pre, d_suf, k)
        assert n + m == k
        assert d_pre[n] + d_suf[m] == min(d_pre[i] + d_suf[k - i] for i in range(k + 1))
        cap = rng.randint(0, size)
        n, m = choose_split(d_pre, d_suf, k, max_last=cap)
        assert n + m == k and m <= cap
        assert d_pre[n] + d_suf[m] == min(d_pre[i] + d_suf[k - i] for i in range(max(0, k - cap), k + 1))


def test_max_last_moves_the_plan_to_the_front():
    # the built-in crop model's profile (8 prompts x 2 seeds): the argmin skips 1 first + 3 last
    d_pre = [0.0, 0.0182, 0.2589, 0.3715, 0.362, 0.3842, 0.4337, 0.5524, 0.5635]
    d_suf = [0.0, 0.0039, 0.1404, 0.2214, 0.2767, 0.2923, 0.3396, 0.5562, 0.5635]
    assert choose_split(d_pre, d_suf, 4) == (1, 3)
    assert choose_split(d_pre, d_suf, 4, max_last=1) == (4, 0)
    assert choose_split(d_pre, d_suf, 4, max_last=0) == (4, 0)
    with pytest.raises(ConfigError):
        choose_split(d_pre, d_suf, 4, max_last=-1)


# A 6-block profile (2 double + 4 single blocks, tiny FLUX) on which the paper's argmin at 50% skips
# 1 block first and 2 last (0.07), with skipping the first 3 close behind (0.15).
SIX_PRE = [0.0, 0.02, 0.1, 0.15, 0.47, 0.55, 0.6]
SIX_SUF = [0.0, 0.01, 0.05, 0.14, 0.25, 0.3, 0.6]


def _suffix_model(kind: str):
    """Tiny FLUX whose last two blocks either add a residual that does not depend on their input
    (`harmless`: their output projections are zero, so each adds gate * bias, which depends on the
    timestep and pooled text only) or add one that depends strongly on it (`hurting`: the same
    projections x 20)."""
    import torch

    model = tiny_model("flux")
    family = model.family
    with torch.no_grad():
        for index in range(family.num_blocks - 2, family.num_blocks):
            proj = family.block(index).proj_out
            proj.weight.mul_(0.0 if kind == "harmless" else 20.0)
    return model


def _reduced_vs_full_after_training(model, n: int, m: int) -> float:
    """|full - reduced| / |full - frozen| after a LoRA-like change of the kept blocks: the reduced
    forward adds the residuals cached from the frozen model (what `blockskip cache` stores)."""
    import torch
    from blockskip.models.skip import SkipPlan, compute_features, reduced_forward

    family = model.family
    plan = SkipPlan.first_last(family.num_blocks, n, m)
    gen = torch.Generator().manual_seed(0)
    latents, sigma = torch.randn(1, 3, 16, 16, generator=gen), torch.tensor([0.5])
    inputs = family.make_inputs(latents, sigma, model.encode_text("a photo of sks leaf"))
    with torch.no_grad():
        entry, residuals, cond, frozen = compute_features(family, plan, inputs)
        for index in plan.kept:  # what LoRA would do: change every kept block's attention a little
            for name in ("to_q", "to_k", "to_v"):
                weight = getattr(family.block(index).attn, name).weight
                weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=gen))
        full = family.forward(**inputs)
        reduced = reduced_forward(family, plan, entry, residuals, cond)
    return ((full - reduced).norm() / (full - frozen).norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["harmless", "hurting"])
def test_the_plan_skips_the_last_blocks_only_where_their_cached_residual_stays_true(kind, encoder):
    """On a model whose last blocks add a residual independent of their input, skipping them costs
    nothing after training (the reduced forward equals the full one) and the plan keeps the paper's
    split; where their residual depends strongly on their input, the cached one is wrong after
    training and the plan skips fewer of them, however low their Dsuf."""
    model = _suffix_model(kind)
    measured = masking_profile(model, encoder, ["a photo of sks leaf", "a red leaf on soil"], [0], steps=2, size=16,
                               progress=False)
    stale = measured["stale"]
    assert len(stale) == model.family.num_blocks + 1 and stale[0] == 0.0
    profile = {"model": {"config_hash": model.family.config_hash()}, "d_pre": SIX_PRE, "d_suf": SIX_SUF,
               "stale": stale}
    k = skip_budget(6, 0.5)
    paper = choose_split(SIX_PRE, SIX_SUF, k)
    assert paper == (1, 2)
    plan = make_plan(profile, model, k, PatchSchedule(s_min=16, s_max=32, granularity=2), LoraSettings(), samples=4)
    chosen = (plan.choice["n"], plan.choice["m"])
    assert plan.choice["paper_split"] == [1, 2]
    if kind == "harmless":
        assert stale[1] == pytest.approx(0.0, abs=1e-5) and stale[2] == pytest.approx(0.0, abs=1e-5)
        assert chosen == paper
        assert "the same as the paper's argmin" in plan.choice["why"]
        assert _reduced_vs_full_after_training(_suffix_model(kind), *paper) < 1e-4
    else:
        assert chosen[1] < paper[1]
        assert "the paper's argmin of Dpre[n] + Dsuf[m] would be (1, 2)" in plan.choice["why"]
        # after training the paper's split is far off the full model, the chosen one much less
        paper_error = _reduced_vs_full_after_training(_suffix_model(kind), *paper)
        assert paper_error > 0.3
        assert _reduced_vs_full_after_training(_suffix_model(kind), *chosen) < paper_error / 2
    # --paper-argmin ignores the staleness term
    plain = make_plan(profile, model, k, PatchSchedule(s_min=16, s_max=32, granularity=2), LoraSettings(),
                      samples=4, paper=True)
    assert (plain.choice["n"], plain.choice["m"]) == paper


def test_split_scores_add_the_staleness_term():
    d_pre, d_suf = [0.0, 0.1, 0.5], [0.0, 0.05, 0.2]
    assert split_scores(d_pre, d_suf, 2) == pytest.approx([0.2, 0.15, 0.5])
    stale = [0.0, 0.8, 0.9]  # weighed by Dpre[L] = 0.5
    assert split_scores(d_pre, d_suf, 2, stale) == pytest.approx([0.2 + 0.9 * 0.5, 0.15 + 0.8 * 0.5, 0.5])
    assert choose_split(d_pre, d_suf, 2) == (1, 1) and choose_split(d_pre, d_suf, 2, stale=stale) == (2, 0)
    with pytest.raises(ConfigError, match="stale"):
        split_scores(d_pre, d_suf, 2, [0.0, 0.1])


@pytest.mark.slow
def test_the_built_in_profile_moves_the_50_percent_plan_to_the_front_and_keeps_30_percent(tmp_path):
    """The committed profile of the built-in crop model: the paper's argmin at 50% is (1, 3), which
    kept 0.51 of LoRA's fidelity gain against 0.81 for (4, 0) (benchmarks/results/quality.md); the
    staleness term takes (4, 0), and keeps 30% at (1, 1). The command says why in one line."""
    from blockskip.models.crops import MODEL_DIR

    expected = {"0.5": ("(4, 0)", "would be (1, 3)"), "0.3": ("(1, 1)", "the same as the paper's argmin")}
    for ratio, (split, why) in expected.items():
        out = tmp_path / f"plan{ratio}.json"
        result = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR,
                           "--skip-ratio", ratio, "--out", out)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith("split "))
        assert line.startswith(f"split {split} of ") and why in line
        plan = json.loads(out.read_text())["plan"]
        assert f"({plan['n']}, {plan['m']})" == split and plan["why"] == line
    out = tmp_path / "paper.json"
    result = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR,
                       "--skip-ratio", "0.5", "--paper-argmin", "--out", out)
    assert result.returncode == 0, result.stderr
    assert (json.loads(out.read_text())["plan"]["n"], json.loads(out.read_text())["plan"]["m"]) == (1, 3)
    given = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR,
                      "--split", "2", "2", "--out", out)
    assert given.returncode == 0, given.stderr
    assert "split (2, 2) of 4 skipped blocks: given" in given.stdout
    both = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR,
                     "--split", "2", "2", "--skip-ratio", "0.5", "--out", out)
    assert both.returncode == 2 and "--split names the skipped blocks itself" in both.stderr


def test_paper_flux_lookups_with_a_crafted_profile():
    """FLUX (57 blocks): 30% -> (7, 10), 40% -> (13, 10), 50% -> (19, 10) when the profile makes
    those the argmin: later prefix blocks cost more, suffix skips beyond 10 cost a lot."""
    family = Flux.tiny(num_layers=19, num_single_layers=38)
    assert family.num_blocks == 57
    model = Model(family, scheduler_config={"shift": 3.0})
    profile = {"model": {"config_hash": family.config_hash()},
               "d_pre": [0.01 * n for n in range(58)],
               "d_suf": [0.0 if m <= 10 else 1.0 + m for m in range(58)]}
    schedule = PatchSchedule(s_min=16, s_max=32, granularity=2)
    for ratio, expected in [(0.3, (7, 10)), (0.4, (13, 10)), (0.5, (19, 10))]:
        plan = make_plan(profile, model, skip_budget(57, ratio), schedule, LoraSettings(), samples=10)
        assert (plan.choice["n"], plan.choice["m"]) == expected
        assert plan.kept == list(range(expected[0], 57 - expected[1]))
        assert all(t.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
                   for t in plan.target_modules)
        assert plan.estimates["train_memory_bytes"] > 0 and plan.estimates["cache_bytes_per_draw"] > 0


@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=1.5), dict(blocks=57), dict(blocks=80)])
def test_infeasible_budgets_are_errors(kwargs):
    with pytest.raises(ConfigError, match="skip"):
        skip_budget(57, **kwargs)


@pytest.mark.slow
def test_plan_cli_rejects_infeasible_ratio(tmp_path):
    profile = tmp_path / "profile.json"
    model = tiny_model("flux")
    profile.write_text(json.dumps({"model": {"config_hash": model.family.config_hash()},
                                   "d_pre": [0.0] * 7, "d_suf": [0.0] * 7}))
    cmd = ["blockskip", "plan", "--profile", str(profile), "--model", "tiny-flux", "--out", str(tmp_path / "p.json"),
           "--s-min", "16", "--s-max", "32"]
    bad = subprocess.run(cmd + ["--skip-ratio", "1.0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "skip ratio must be in [0, 1)" in bad.stderr
    good = subprocess.run(cmd + ["--skip-ratio", "0.5"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "p.json").read_text())["plan"]["n"] + 3 == 6 - len(
        json.loads((tmp_path / "p.json").read_text())["plan"]["kept"]) + 3


def _plan_cli(*args):
    return subprocess.run(["blockskip", "plan", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_plan_on_the_built_in_model_takes_its_sizes_and_text_length(tmp_path):
    """A newcomer's first plan: the built-in 32 px model, the committed profile, no size flags.
    The FLUX paper's 256/512 px and 512 text tokens would estimate over 20 GiB for 2.8 M params."""
    from blockskip.models.crops import MODEL_DIR

    out = tmp_path / "plan.json"
    result = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR,
                       "--skip-ratio", "0.5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "--s-max 32 (the image_size in the model's blockskip.json)" in result.stdout
    assert "--s-min 16 (half of --s-max)" in result.stdout
    assert "--text-len 16 (the max_length of the model's text encoder)" in result.stdout
    plan = PlanDocument.load(out)
    assert (plan.schedule.s_min, plan.schedule.s_max) == (16, 32)
    # measured: `blockskip train --track-memory` on this plan peaks at 8.8 MiB of tensors
    assert plan.estimates["train_memory_bytes"] < 32 * 2**20
    assert "MiB (fp32, batch 1 at 16x16, 16 text tokens)" in result.stdout
    base = plan.estimates["base_pack_bytes"]
    subject = plan.estimates["cache_bytes"]
    assert f"base pack {base / 2**20:.1f} MiB (kept weights, installed once per model and plan)" in result.stdout
    assert f"subject bundle: features {subject / 2**20:.1f} MiB (300 draws x " in result.stdout
    assert (plan.samples, plan.feature_dtype) == (300, "bf16")  # the defaults measured in feature-storage/


@pytest.mark.slow
def test_plan_flags_override_the_model_defaults(tmp_path):
    from blockskip.models.crops import MODEL_DIR

    out = tmp_path / "plan.json"
    result = _plan_cli("--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR, "--skip-ratio",
                       "0.5", "--out", out, "--s-max", "24", "--text-len", "8", "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    assert "defaults from the model: --s-min 12 (half of --s-max)\n" in result.stdout
    plan = PlanDocument.load(out)
    assert (plan.schedule.s_min, plan.schedule.s_max) == (12, 24)
    assert plan.estimates["assumes"] == "batch 1 at 12x12, 8 text tokens" and plan.estimates["precision"] == "bf16"


@pytest.mark.slow
def test_plan_on_a_latent_flux_without_a_recorded_size_takes_the_papers_sizes(tmp_path):
    from diffusers import AutoencoderKL

    from blockskip.models.pipeline import save_model

    model = tiny_model("flux")
    model.family = Flux.tiny(in_channels=16)  # 4 latent channels x 2 x 2 packing
    save_model(model, tmp_path / "m")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4).save_pretrained(tmp_path / "m" / "vae")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"model": {"config_hash": model.family.config_hash()}, "size": 64,
                                   "d_pre": [0.0] * 7, "d_suf": [0.0] * 7}))
    result = _plan_cli("--profile", profile, "--model", tmp_path / "m", "--skip-ratio", "0.5",
                       "--out", tmp_path / "plan.json")
    assert result.returncode == 0, result.stderr
    assert "--s-max 512 (the paper's FLUX s_max), --s-min 256 (half of --s-max)" in result.stdout
    assert "--text-len 16 (the max_length of the model's text encoder)" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_profile_on_the_built_in_model_generates_at_its_size(tmp_path):
    """At the old fixed 256 px the 32 px model ran 64x the tokens and took many minutes."""
    from blockskip.models.crops import MODEL_DIR

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a leaf\n")
    out = tmp_path / "profile.json"
    result = subprocess.run(["blockskip", "profile", "--model", str(MODEL_DIR), "--out", str(out), "--prompts",
                             str(prompts), "--seeds", "1", "--steps", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "generation size 32 px (the image_size in the model's blockskip.json" in result.stdout
    assert json.loads(out.read_text())["size"] == 32


@pytest.mark.slow
def test_profile_without_a_text_encoder_says_it_needs_one(tmp_path):
    from blockskip.models.pipeline import save_model

    model = tiny_model("flux")
    model.text_encoder = None
    save_model(model, tmp_path / "m")
    result = subprocess.run(["blockskip", "profile", "--model", str(tmp_path / "m"), "--out",
                             str(tmp_path / "p.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "profile generates images from prompts, so it needs the model's text encoder" in result.stderr
    assert "text_encoder/" in result.stderr and "blockskip.json" in result.stderr
    assert "prompt bank" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_cache_without_a_text_encoder_says_it_needs_one(tmp_path, capsys):
    from blockskip.cli import main
    from blockskip.models.pipeline import save_model

    model = tiny_model("flux")
    model.text_encoder = None
    save_model(model, tmp_path / "m")
    plan_for(tiny_model("flux"), 2, 1).save(tmp_path / "plan.json")
    (tmp_path / "images").mkdir()
    code = main(["cache", "--model", str(tmp_path / "m"), "--plan", str(tmp_path / "plan.json"), "--images",
                 str(tmp_path / "images"), "--prompt", "a photo of sks leaf", "--out", str(tmp_path / "stage")])
    err = capsys.readouterr().err
    assert code == 2 and "needs the model's text encoder" in err and "prompt bank" not in err
    assert not (tmp_path / "stage").exists()


@pytest.mark.slow
def test_plan_prints_the_subject_bundle_for_the_storage_chosen(tmp_path):
    from blockskip.models.crops import MODEL_DIR

    args = ["--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR, "--skip-ratio", "0.5"]
    sizes = {}
    for feature_dtype in ("fp32", "bf16", "fp8"):
        out = tmp_path / f"{feature_dtype}.json"
        result = _plan_cli(*args, "--out", out, "--feature-dtype", feature_dtype, "--samples", "500")
        assert result.returncode == 0, result.stderr
        plan = PlanDocument.load(out)
        assert (plan.samples, plan.feature_dtype) == (500, feature_dtype)
        est = sizes[feature_dtype] = plan.estimates
        assert est["cache_bytes"] > 500 * est["cache_bytes_per_draw"]
        line = (f"subject bundle: features {est['cache_bytes'] / 2**20:.1f} MiB (500 draws x "
                f"{est['cache_bytes_per_draw'] / 1024:.1f} KiB, {feature_dtype}) + prompt bank 4.2 KiB per prompt")
        assert line in result.stdout
    assert sizes["bf16"]["cache_bytes_per_draw"] * 2 == sizes["fp32"]["cache_bytes_per_draw"]
    assert sizes["fp8"]["cache_bytes_per_draw"] < 0.75 * sizes["bf16"]["cache_bytes_per_draw"]


@pytest.mark.slow
def test_plan_quant_is_recorded_and_shrinks_the_base_pack_and_the_estimate(tmp_path):
    """`--quant` goes into the plan JSON (what `cache` and `bundle` honour) and the estimates count
    the kept Linear weights as stored: int8 about half, NF4 about a quarter of bf16's bytes."""
    from blockskip.models.crops import MODEL_DIR

    plans = {}
    for quant in ("none", "int8", "nf4"):
        out = tmp_path / f"{quant}.json"
        result = subprocess.run([sys.executable, "-m", "blockskip", "plan", "--profile",
                                 str(MODEL_DIR.parent / "crop-profile.json"), "--model", str(MODEL_DIR),
                                 "--skip-ratio", "0.5", "--out", str(out), "--precision", "bf16",
                                 *(["--quant", quant] if quant != "none" else [])], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        plans[quant] = PlanDocument.load(out)
        assert plans[quant].quant == quant and plans[quant].estimates["quant"] == quant
    weights = {q: p.estimates["weight_bytes"] for q, p in plans.items()}
    assert weights["nf4"] < weights["int8"] < weights["none"]
    assert plans["nf4"].estimates["base_pack_bytes"] < plans["int8"].estimates["base_pack_bytes"] < \
        plans["none"].estimates["base_pack_bytes"]
    assert plans["nf4"].estimates["train_memory_bytes"] < plans["none"].estimates["train_memory_bytes"]
    assert "Linear weights nf4" in subprocess.run(
        [sys.executable, "-m", "blockskip", "plan", "--profile", str(MODEL_DIR.parent / "crop-profile.json"),
         "--model", str(MODEL_DIR), "--skip-ratio", "0.5", "--out", str(tmp_path / "x.json"), "--quant", "nf4"],
        capture_output=True, text=True).stdout
    bad = subprocess.run([sys.executable, "-m", "blockskip", "plan", "--profile", "p", "--model", "m",
                          "--skip-ratio", "0.5", "--out", "o", "--quant", "int4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr


@pytest.mark.slow
def test_the_lora_settings_default_to_what_the_model_records(tmp_path):
    """One source of LoRA defaults for plan, the worker and the demo: the model folder's
    blockskip.json (the built-in model: rank 8 on attention and MLPs), else rank 16 on attention;
    a flag given overrides only itself."""
    from blockskip.models.crops import MODEL_DIR
    from blockskip.models.pipeline import load_model, save_model
    from blockskip.plan import LoraSettings

    assert LoraSettings.for_model(load_model(MODEL_DIR)) == (LoraSettings(8, 8.0, "all"), "the model's blockskip.json")
    assert LoraSettings.for_model(tiny_model("flux")) == (LoraSettings(), "blockskip's defaults")
    args = ["--profile", MODEL_DIR.parent / "crop-profile.json", "--model", MODEL_DIR, "--skip-ratio", "0.5"]
    result = _plan_cli(*args, "--out", tmp_path / "a.json")
    assert result.returncode == 0 and "LoRA from the model's blockskip.json: rank 8, alpha 8, scope all" in result.stdout
    assert PlanDocument.load(tmp_path / "a.json").lora == LoraSettings(8, 8.0, "all")
    result = _plan_cli(*args, "--rank", "4", "--out", tmp_path / "b.json")
    assert result.returncode == 0 and PlanDocument.load(tmp_path / "b.json").lora == LoraSettings(4, 8.0, "all")
    save_model(tiny_model("flux"), tmp_path / "m")
    (tmp_path / "m" / "blockskip.json").write_text(json.dumps(
        {**json.loads((tmp_path / "m" / "blockskip.json").read_text()), "lora": {"rank": 0}}))
    with pytest.raises(InputError, match="blockskip.json has a 'lora' entry blockskip cannot use"):
        LoraSettings.for_model(load_model(tmp_path / "m"))

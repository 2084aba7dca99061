"""Feature storage: what each `feature_dtype` keeps of a feature, the fp8 scales, and a reader that
streams one shard at a time."""

import json

import pytest
import torch
from safetensors import safe_open

from blockskip.features import FP8_MAX, FeatureReader, dequantize_fp8, quantize_fp8, store_draw
from blockskip.host.cache import build_cache
from blockskip.models.pipeline import tiny_model
from helpers import plan_for, subject_images


def features_with_outliers() -> torch.Tensor:
    """(tokens, channels) with rows spanning six decades, one huge value and an all-zero row."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen) * torch.logspace(-3, 3, 64)[:, None]
    x[5, 7] = 1e4
    x[9] = 0
    return x


def test_bf16_storage_keeps_every_value_to_half_a_bf16_step():
    x = features_with_outliers()
    stored = store_draw({"0/entry/hidden_states": x}, "bf16")["0/entry/hidden_states"]
    assert stored.dtype == torch.bfloat16
    assert ((stored.float() - x).abs() <= 2**-8 * x.abs()).all()  # 8 significant bits, round to nearest


@pytest.mark.parametrize("per", ["token", "channel"])
def test_fp8_round_trip_error_is_bounded_by_e4m3_rounding(per):
    """Each value comes back within half an e4m3 step: 2^-4 of itself where it is a normal
    number after scaling, 2^-10 of its scale below that (subnormals)."""
    x = features_with_outliers()
    q, scale = quantize_fp8(x, per)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if per == "token" else (1, 48))
    y = dequantize_fp8(q, scale)
    assert torch.isfinite(y).all()
    assert ((y - x).abs() <= torch.maximum(2**-4 * x.abs(), 2**-10 * scale)).all()
    assert torch.equal(y[9], torch.zeros(48)), "an all-zero token comes back zero, not NaN"


def test_fp8_per_token_scale_is_the_rows_absmax_and_keeps_a_quiet_token_precise():
    x = features_with_outliers()
    q, scale = quantize_fp8(x, "token")
    nonzero = x.abs().amax(dim=1) > 0
    assert torch.allclose(scale[nonzero, 0], x.abs().amax(dim=1)[nonzero] / FP8_MAX)
    assert (q.float().abs().amax(dim=1)[nonzero] == FP8_MAX).all(), "each token uses the full e4m3 range"
    y = dequantize_fp8(q, scale)
    quiet = 0  # the smallest row, 1e6 times below the loudest: per token it keeps its own precision
    assert ((y[quiet] - x[quiet]).norm() / x[quiet].norm()) < 0.04
    _, channel_scale = quantize_fp8(x, "channel")
    y_channel = dequantize_fp8(quantize_fp8(x, "channel")[0], channel_scale)
    assert ((y_channel[quiet] - x[quiet]).norm() / x[quiet].norm()) > 0.5, "per channel the quiet token is lost"


def test_fp8_refuses_non_finite_features():
    x = torch.ones(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8(x)


def test_fp8_draw_layout_quantizes_states_and_keeps_the_rest_bf16():
    states = {"3/entry/hidden_states": torch.randn(16, 8), "3/residual/4-6/hidden_states": torch.randn(16, 8)}
    rest = {"3/target": torch.randn(3, 4, 4), "3/cond/temb": torch.randn(8), "3/cond/grid": torch.tensor([4, 4])}
    stored = store_draw({**states, **rest}, "fp8")
    assert set(stored) == set(states) | set(rest) | {"3/scale/entry/hidden_states",
                                                      "3/scale/residual/4-6/hidden_states"}
    assert all(stored[k].dtype == torch.float8_e4m3fn for k in states)
    assert stored["3/scale/entry/hidden_states"].shape == (16, 1)
    assert stored["3/target"].dtype == stored["3/cond/temb"].dtype == torch.bfloat16
    assert torch.equal(stored["3/cond/grid"], rest["3/cond/grid"]), "integers are stored as they are"


@pytest.mark.slow
@pytest.mark.parametrize("feature_dtype", ["bf16", "fp8"])
def test_reader_dequantizes_to_the_training_dtype(tmp_path, feature_dtype):
    model = tiny_model("flux")
    fp32 = build_cache(model, plan_for(model, 2, 2), subject_images(tmp_path / "i"), ["sks"], tmp_path / "a",
                       shard_size=4, progress=False, feature_dtype="fp32")
    small = build_cache(model, plan_for(model, 2, 2), subject_images(tmp_path / "i"), ["sks"], tmp_path / "b",
                        shard_size=4, progress=False, feature_dtype=feature_dtype)
    exact, stored = FeatureReader(fp32, ("txt_ids",)), FeatureReader(small, ("txt_ids",))
    tolerance = {"bf16": 2**-8, "fp8": 0.04}[feature_dtype]  # relative L2, per tensor
    for position in range(len(exact)):
        (e1, r1, c1, t1, _), (e2, r2, c2, t2, _) = exact.get(position), stored.get(position)
        pairs = [(e1[k], e2[k]) for k in e1] + [(r1[s][k], r2[s][k]) for s in r1 for k in r1[s]] + [(t1, t2)]
        pairs += [(c1[k], c2[k]) for k in c1 if c1[k].is_floating_point()]
        for want, got in pairs:
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert (got - want).norm() <= tolerance * want.norm()


@pytest.mark.slow
def test_reader_reads_only_the_shard_of_the_draw_asked_for(tmp_path):
    """The board streams: a draw is read from its own memory-mapped shard, one shard open at a time,
    so the other shards (many GiB on a real bundle) are never loaded, here not even readable."""
    model = tiny_model("sana")
    out = build_cache(model, plan_for(model, 2, 1, samples=10), subject_images(tmp_path / "i"), ["sks"],
                      tmp_path / "s", shard_size=4, progress=False, feature_dtype="fp8")
    reader = FeatureReader(out, model.family.prompt_cond_keys)
    assert len(reader) == 10
    last = out / "features" / "shard-00002.safetensors"
    last.write_bytes(last.read_bytes()[:100])  # damaged after the reader indexed it
    seen = []
    for position in range(8):  # shards 0 and 1
        draw = reader.get(position)[-1]
        seen.append(draw["index"])
        assert reader._open[0].name == f"shard-{position // 4:05d}.safetensors", "one shard open at a time"
    assert seen == list(range(8))
    with pytest.raises(Exception):
        reader.get(8)


def test_fp32_storage_is_the_features_bit_for_bit(tmp_path):
    """fp32 is what the cache always wrote: the frozen model's tensors, unchanged, no scales."""
    from blockskip.host.cache import draw_inputs
    from blockskip.features import draw_tensors
    from blockskip.host.patches import load_image
    from blockskip.models.skip import compute_features

    model = tiny_model("flux")
    plan_doc = plan_for(model, 1, 2)
    paths = subject_images(tmp_path / "i")
    out = build_cache(model, plan_doc, paths, ["sks"], tmp_path / "s", shard_size=8, progress=False)
    assert json.loads((out / "bundle.json").read_text())["feature_dtype"] == "fp32"
    images = [(p.name, load_image(p)) for p in paths]
    schedule = plan_doc.schedule
    with safe_open(str(out / "features" / "shard-00000.safetensors"), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    expected = {}
    for index in range(6):
        inputs, target, _ = draw_inputs(model, schedule, images, [model.encode_text("sks")], 1, 0, index)
        entry, residuals, cond, _ = compute_features(model.family, plan_doc.skip, inputs)
        expected.update(draw_tensors(index, entry, residuals, cond, target, model.family.prompt_cond_keys))
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key

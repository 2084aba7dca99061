import json

import numpy as np
import pytest
import torch
from PIL import Image

from blockskip.errors import ConfigError, InputError
from blockskip.host.patches import SCHEDULES, PatchSchedule, load_image, to_tensor

FLUX = dict(s_min=256, s_max=512, granularity=16)


def _noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("schedule, expected", [
    ("low-to-high", (256, 384, 512)),
    ("high-to-low", (512, 384, 256)),
])
def test_crop_side_at_0_half_and_T(schedule, expected):
    patches = PatchSchedule(**FLUX, schedule=schedule)
    rng = np.random.default_rng(0)
    assert tuple(patches.crop_side(t, rng) for t in (0.0, 0.5, 1.0)) == expected


def test_crop_side_scales_with_t_max():
    patches = PatchSchedule(**FLUX, t_max=1000.0)
    assert [patches.crop_side(t) for t in (0.0, 500.0, 1000.0)] == [256, 384, 512]


def test_crop_side_rounds_to_granularity():
    patches = PatchSchedule(**FLUX)
    assert patches.crop_side(0.3) == 336  # 256 + 0.3 * 256 = 332.8 -> 21 * 16
    assert all(patches.crop_side(t) % 16 == 0 for t in np.linspace(0, 1, 37))


def test_random_schedule_ignores_t_and_covers_the_grid():
    patches = PatchSchedule(**FLUX, schedule="random")
    rng = np.random.default_rng(0)
    for t in (0.0, 0.5, 1.0):
        sides = {patches.crop_side(t, rng) for _ in range(400)}
        assert sides == set(range(256, 513, 16))


def test_resize_schedule_has_no_crop_side():
    assert PatchSchedule(**FLUX, schedule="resize").crop_side(0.5) is None


@pytest.mark.parametrize("t", [-0.1, 1.1, float("nan")])
def test_timestep_outside_range_is_rejected(t):
    with pytest.raises(ConfigError, match="timestep"):
        PatchSchedule(**FLUX).crop_side(t)


@pytest.mark.parametrize("kwargs, field", [
    (dict(s_min=512, s_max=256), "s_min must be <= s_max"),
    (dict(s_min=250, s_max=512), "s_min"),
    (dict(s_min=256, s_max=500), "s_max"),
    (dict(granularity=0), "granularity"),
    (dict(schedule="spiral"), "schedule"),
    (dict(t_max=0.0), "t_max"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PatchSchedule(**{**FLUX, **kwargs})


def test_dict_round_trip_through_json():
    patches = PatchSchedule(s_min=512, s_max=1024, granularity=32, schedule="high-to-low")
    assert PatchSchedule.from_dict(json.loads(json.dumps(patches.to_dict()))) == patches
    with pytest.raises(ConfigError, match="colour"):
        PatchSchedule.from_dict({**patches.to_dict(), "colour": 1})


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("size", [(333, 517), (1000, 260), (256, 256), (512, 512)])
@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_patch_is_s_min_square_inside_the_image(schedule, size, t):
    patches = PatchSchedule(**FLUX, schedule=schedule)
    image = _noise_image(*size)
    patch, info = patches.sample_patch(image, t, np.random.default_rng(1))
    assert patch.mode == "RGB" and patch.size == (256, 256)
    width, height = size
    assert info["side"] % 16 == 0 or schedule == "resize"
    assert 256 <= info["side"] <= min(width, height)
    assert 0 <= info["left"] <= width - info["side"] and 0 <= info["top"] <= height - info["side"]


def test_crop_is_clamped_to_the_shorter_side_rounded_down():
    patches = PatchSchedule(**FLUX)
    _, info = patches.sample_patch(_noise_image(333, 517), 1.0, np.random.default_rng(0))
    assert info["side"] == 320  # s(T) = 512 > 333 -> 333 rounded down to 16
    _, info = patches.sample_patch(_noise_image(1000, 260), 1.0, np.random.default_rng(0))
    assert info["side"] == 256


def test_low_to_high_sees_the_whole_image_at_T_and_native_pixels_at_0():
    patches = PatchSchedule(s_min=32, s_max=64, granularity=16)
    image = _noise_image(64, 64)
    whole, info = patches.sample_patch(image, 1.0, np.random.default_rng(0))
    assert info == {"side": 64, "left": 0, "top": 0}
    assert np.allclose(np.asarray(whole, float), np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS), float))
    native, info = patches.sample_patch(image, 0.0, np.random.default_rng(0))
    box = (info["left"], info["top"], info["left"] + 32, info["top"] + 32)
    assert np.array_equal(np.asarray(native), np.asarray(image.crop(box)))


def test_resize_takes_the_centered_square_without_distortion():
    image = Image.new("RGB", (96, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))  # blue center square, red on both sides
    patch, info = PatchSchedule(s_min=16, s_max=32, granularity=16, schedule="resize").sample_patch(
        image, 0.7, np.random.default_rng(0))
    assert info == {"side": 32, "left": 32, "top": 0}
    pixels = np.asarray(patch).reshape(-1, 3)
    assert (pixels == [0, 0, 255]).all()


def test_same_seed_same_patch_and_positions_vary_over_draws():
    patches = PatchSchedule(s_min=32, s_max=64, granularity=16, schedule="random")
    image = _noise_image(133, 97)
    a = patches.sample_patch(image, 0.3, np.random.default_rng(7))
    b = patches.sample_patch(image, 0.3, np.random.default_rng(7))
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    rng = np.random.default_rng(7)
    infos = [patches.sample_patch(image, 0.3, rng)[1] for _ in range(30)]
    assert len({i["left"] for i in infos}) > 5 and len({i["top"] for i in infos}) > 5
    assert len({i["side"] for i in infos}) > 1


def test_sample_patch_rejects_too_small_image():
    image = _noise_image(300, 200)
    image.info["source"] = "small.png"
    with pytest.raises(InputError, match=r"small.png: 300x200 .* s_min=256"):
        PatchSchedule(**FLUX).sample_patch(image, 0.5, np.random.default_rng(0))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "1", "CMYK", "I;16"])
def test_load_image_any_mode_gives_rgb(tmp_path, mode):
    path = tmp_path / "photo.png" if mode != "CMYK" else tmp_path / "photo.jpg"
    _noise_image(45, 37).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (45, 37)
    assert image.info["source"] == str(path)


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    rgba.paste((10, 200, 30, 255), (0, 0, 10, 10))
    rgba.save(tmp_path / "cutout.png")
    pixels = np.asarray(load_image(tmp_path / "cutout.png"))
    assert (pixels[:, :10] == [10, 200, 30]).all() and (pixels[:, 10:] == 255).all()
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    palette.info["transparency"] = 0
    palette.save(tmp_path / "pal.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "pal.png"))
    assert (pixels[:, :4] == 9).all() and (pixels[:, 4:] == 255).all()


def test_load_image_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "portrait.jpg")
    assert upright.size == (20, 40)
    pixels = np.asarray(upright, float).mean(axis=(1, 2))
    assert pixels[:15].mean() > 200 and pixels[-15:].mean() < 50  # white end now on top


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("definitely not a jpeg")
    with pytest.raises(InputError, match="notes.jpg"):
        load_image(path)
    with pytest.raises(InputError, match="missing.png: no such"):
        load_image(tmp_path / "missing.png")


def test_truncated_image_names_the_file(tmp_path):
    _noise_image(64, 64).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_too_small_image_names_file_and_sizes(tmp_path):
    _noise_image(300, 200).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match=r"tiny.png: image is 300x200; its shorter side must be at least 256"):
        load_image(tmp_path / "tiny.png", min_side=256)
    assert load_image(tmp_path / "tiny.png", min_side=200).size == (300, 200)


def test_to_tensor_layout_and_range():
    image = Image.new("RGB", (5, 3), (255, 0, 0))
    image.putpixel((4, 2), (0, 255, 128))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert torch.allclose(tensor[:, 2, 4], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    with pytest.raises(InputError, match="RGB"):
        to_tensor(image.convert("L"))

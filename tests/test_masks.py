"""Inpainting masks and canvases (pure PIL): mode rules, blur, crop box, outpaint canvas, paste-back."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from optimized_sd.errors import UserError
from optimized_sd.pipelines.masks import (
    Canvas,
    InpaintOptions,
    crop_box,
    fill_masked,
    load_mask,
    mask_luminance,
    outpaint_canvas,
    parse_outpaint,
    prepare_region,
)


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x.repeat(height, 0), y.repeat(width, 1), np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def square_mask(size=(96, 64), box=(40, 20, 56, 36), value: int = 255) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_mask_modes():
    luminance = square_mask()
    assert as_array(mask_luminance(luminance)).tolist() == as_array(luminance).tolist()
    rgb = Image.merge("RGB", [luminance] * 3)
    assert np.array_equal(as_array(mask_luminance(rgb)), as_array(luminance))
    # RGBA with a real alpha: the alpha is the mask (opaque = repainted), whatever the colours.
    rgba = Image.new("RGBA", luminance.size, (0, 0, 0, 0))
    rgba.putalpha(luminance)
    assert np.array_equal(as_array(mask_luminance(rgba)), as_array(luminance))
    la = Image.merge("LA", [Image.new("L", luminance.size, 0), luminance])
    assert np.array_equal(as_array(mask_luminance(la)), as_array(luminance))
    # Fully opaque alpha: the colours are the mask.
    opaque = rgb.convert("RGBA")
    assert np.array_equal(as_array(mask_luminance(opaque)), as_array(luminance))
    one_bit = luminance.convert("1")
    assert np.array_equal(as_array(mask_luminance(one_bit)), as_array(luminance))


def test_load_mask_errors(tmp_path):
    with pytest.raises(UserError, match="mask not found"):
        load_mask(tmp_path / "missing.png")
    text = tmp_path / "mask.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="not a readable image"):
        load_mask(text)


def test_all_black_mask_is_an_error():
    with pytest.raises(UserError, match="all black"):
        prepare_region(gradient(), (96, 64), InpaintOptions(mask=Image.new("L", (96, 64), 0)))
    with pytest.raises(UserError, match="all black"):  # all white, inverted
        prepare_region(gradient(), (96, 64), InpaintOptions(mask=Image.new("L", (96, 64), 255), invert_mask=True))


def test_mask_of_another_size_is_resized_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="optimized_sd"):
        region = prepare_region(gradient(), (96, 64), InpaintOptions(mask=square_mask((48, 32), (20, 10, 28, 18)), mask_blur=0))
    assert "resized" in caplog.text
    assert region.mask.size == (96, 64)
    assert as_array(region.mask)[28, 48] == 255 and as_array(region.mask)[2, 2] == 0


def test_invert_and_blur():
    region = prepare_region(gradient(), (96, 64), InpaintOptions(mask=square_mask(), invert_mask=True, mask_blur=0))
    assert as_array(region.mask)[28, 48] == 0 and as_array(region.mask)[0, 0] == 255
    sharp = as_array(prepare_region(gradient(), (96, 64), InpaintOptions(mask=square_mask(), mask_blur=0)).mask)
    soft = as_array(prepare_region(gradient(), (96, 64), InpaintOptions(mask=square_mask(), mask_blur=4)).mask)
    assert set(np.unique(sharp).tolist()) == {0, 255}
    assert 0 < soft[28, 38] < 255  # the edge is soft
    assert soft[28, 48] > 200 and soft[0, 0] == 0
    with pytest.raises(UserError, match="mask_blur must be 0 or more"):
        prepare_region(gradient(), (96, 64), InpaintOptions(mask=square_mask(), mask_blur=-1))


def test_crop_box_pads_and_matches_the_aspect_ratio():
    mask = square_mask((200, 100), (90, 40, 110, 60))
    assert crop_box(mask, 10, (64, 64)) == (80, 30, 120, 70)
    left, top, right, bottom = crop_box(mask, 10, (128, 64))
    assert (right - left, bottom - top) == (80, 40) and (left + right) // 2 == 100
    # Near an edge the box shifts to stay inside the image; too big for the image, it is capped.
    edge = square_mask((200, 100), (0, 0, 10, 10))
    assert crop_box(edge, 0, (64, 64)) == (0, 0, 10, 10)
    assert crop_box(edge, 0, (128, 32)) == (0, 0, 40, 10)
    assert crop_box(square_mask((200, 100), (0, 0, 200, 50)), 0, (64, 64)) == (0, 0, 200, 100)
    with pytest.raises(UserError, match="padding"):
        crop_box(mask, -1, (64, 64))


def test_only_masked_generates_the_box_and_pastes_it_back():
    image = gradient()
    region = prepare_region(image, (64, 64), InpaintOptions(mask=square_mask(), area="masked", padding=8, mask_blur=0))
    assert region.canvas.box == (32, 12, 64, 44)
    assert region.image.size == (64, 64) and region.mask.size == (64, 64)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    out = as_array(region.canvas.paste(red))
    assert out.shape == (64, 96, 3)
    assert out[28, 48].tolist() == [255, 0, 0]
    keep = as_array(square_mask()) == 0
    assert np.array_equal(out[keep], as_array(image)[keep])  # outside the mask: the image, exactly


def test_paste_blends_by_the_blurred_mask():
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    mask = Image.new("L", (8, 8), 128)
    out = as_array(Canvas(image, mask, (0, 0, 8, 8)).paste(Image.new("RGB", (8, 8), (200, 200, 200))))
    assert np.all(np.abs(out - 100) <= 1)


def test_outpaint_canvas_and_mask():
    image = gradient(64, 64)
    canvas, mask = outpaint_canvas(image, (16, 0, 8, 0), blur=4)
    assert canvas.size == (80, 72)
    pixels, m = as_array(canvas), as_array(mask)
    assert np.array_equal(pixels[8:, 16:], as_array(image))  # the old image is untouched
    assert m[0, 0] == 255 and m[40, 5] == 255  # the new border is repainted
    assert m[40, 16] == 255 and m[40, 18] == 128 and m[40, 20] == 0  # ramp inward over 4 pixels
    assert m[71, 79] == 0  # far corner of the old image: kept
    # The border is the nearest edge colour plus noise: close to it on average, not equal (blue: 90, no clipping).
    left_fill = pixels[8:, :16, 2].astype(np.float32) - 90
    assert abs(left_fill.mean()) < 3 and left_fill.std() > 10
    again, _ = outpaint_canvas(image, (16, 0, 8, 0), blur=4)
    assert np.array_equal(as_array(again), pixels)  # fixed seed


def test_outpaint_region_and_sizes():
    image = gradient(64, 64)
    options = InpaintOptions(outpaint=(0, 12, 0, 0), mask_blur=0)
    region = prepare_region(image, options.generation_size(image.size), options)
    assert region.canvas.image.size == (76, 64) and region.image.size == (64, 64)
    assert as_array(region.canvas.mask)[:, 64:].min() == 255 and as_array(region.canvas.mask)[:, :64].max() == 0
    assert InpaintOptions(mask="m.png").generation_size((100, 70)) == (64, 64)
    assert InpaintOptions(mask="m.png", area="masked").generation_size((100, 70)) == (512, 512)
    with pytest.raises(UserError, match="64x64"):
        InpaintOptions(mask="m.png").generation_size((40, 40))


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,3,-4", "0,0,0,0"])
def test_parse_outpaint_rejects(text):
    with pytest.raises(UserError, match="outpaint"):
        parse_outpaint(text)


def test_parse_outpaint():
    assert parse_outpaint("64, 0,32,0") == (64, 0, 32, 0)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (InpaintOptions(), "needs a mask"),
        (InpaintOptions(mask="m.png", area="middle"), "area 'middle' is unknown"),
        (InpaintOptions(mask="m.png", padding=-2), "padding"),
        (InpaintOptions(outpaint=(0, 0, 0, 0)), "outpaint"),
        (InpaintOptions(mask="m.png", masked_content="latent_noise"), "masked_content 'latent_noise' is unknown"),
    ],
)
def test_options_check(options, needle):
    with pytest.raises(UserError, match=needle):
        options.check()


def test_outpaint_keeps_the_users_mask():
    image = gradient(64, 64)
    options = InpaintOptions(mask=square_mask((64, 64), (10, 10, 20, 20)), outpaint=(8, 0, 0, 0), mask_blur=0)
    mask = as_array(prepare_region(image, (72, 64), options).canvas.mask)
    assert mask[:, :8].min() == 255 and mask[15, 23] == 255 and mask[40, 40] == 0


def test_fill_paints_the_hole_in_the_colours_around_it():
    left_red_right_blue = np.zeros((64, 96, 3), np.uint8)
    left_red_right_blue[:, :48] = (255, 0, 0)
    left_red_right_blue[:, 48:] = (0, 0, 255)
    image = Image.fromarray(left_red_right_blue)
    mask = square_mask(box=(24, 16, 72, 48))  # straddles the red/blue edge
    filled = as_array(fill_masked(image, mask))
    hole = as_array(mask) >= 128
    assert np.array_equal(filled[~hole], as_array(image)[~hole])  # kept pixels untouched
    assert (filled[hole][:, 1] == 0).all()  # no colour that is not around the hole
    row = filled[32, 24:72]  # across the hole: red fading into blue, monotonically
    assert row[0, 0] > 200 and row[-1, 2] > 200
    assert (np.diff(row[:, 0]) <= 0).all() and (np.diff(row[:, 2]) >= 0).all()
    grey = Image.new("RGB", (40, 30), (120, 130, 140))
    assert np.array_equal(
        as_array(fill_masked(grey, square_mask((40, 30), (5, 5, 35, 25)))), as_array(grey)
    )  # one colour around: that colour
    everything = Image.new("L", (40, 30), 255)
    assert np.array_equal(as_array(fill_masked(grey, everything)), as_array(grey))  # no colour to take: unchanged


def test_fill_applies_to_the_region_that_is_generated():
    image = gradient()
    mask = square_mask()
    original = prepare_region(image, (96, 64), InpaintOptions(mask=mask, mask_blur=0))
    filled = prepare_region(image, (96, 64), InpaintOptions(mask=mask, mask_blur=0, masked_content="fill"))
    hole = as_array(mask) >= 128
    assert np.array_equal(as_array(filled.image)[~hole], as_array(original.image)[~hole])
    assert not np.array_equal(as_array(filled.image)[hole], as_array(original.image)[hole])
    assert np.array_equal(as_array(filled.canvas.image), as_array(image))  # the paste-back target is the untouched image

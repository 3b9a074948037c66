"""AugReg augmentation: each op against an independent float64 formula, the reference's
magnitude mapping, Inception-crop ranges, Mixup, the settings table, determinism."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from flaxlab.data import augment as A


def images(n=4, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def trunc_blend64(image1, image2, factor):
    """The reference's blend in float64: image1 + factor (image2 - image1), clipped, floored."""
    x1, x2 = np.asarray(image1, np.float64), np.asarray(image2, np.float64)
    return np.floor(np.clip(x1 + factor * (x2 - x1), 0, 255)), x1 + factor * (x2 - x1)


def assert_matches_float64(got, expected, raw):
    """Equal, except where the float64 value sits on an integer (float32 may land below)."""
    got = got.astype(np.int64)
    expected = expected.astype(np.int64)
    near_integer = np.abs(raw - np.round(raw)) < 1e-4
    assert np.all(np.abs(got - expected) <= 1)
    np.testing.assert_array_equal(got[~near_integer], expected[~near_integer])


# --------------------------------------------------------------------------------------------
# Colour ops against float64 formulas.


@pytest.mark.parametrize("threshold", [0, 1, 100, 128, 255, 256, 384, 512])
def test_solarize_compares_with_the_threshold_cast_to_uint8(threshold):
    x = images()
    t = threshold % 256  # TF casts the Python int to uint8: 256 -> 0 (big_vision issue #110)
    expected = np.where(x.astype(np.int64) < t, x, 255 - x.astype(np.int64))
    np.testing.assert_array_equal(A.solarize(x, threshold), expected)
    np.testing.assert_array_equal(A.solarize(x[0], threshold), expected[0])


def test_solarize_add_adds_to_dark_pixels_only():
    x = images()
    for addition in (0, 50, 110, 220, -30):
        added = np.clip(x.astype(np.int64) + addition, 0, 255)
        expected = np.where(x < 128, added, x)
        np.testing.assert_array_equal(A.solarize_add(x, addition), expected)


@pytest.mark.parametrize("bits", range(0, 11))
def test_posterize_keeps_bits_with_tf_shift_clamping(bits):
    x = images()
    shift = min((8 - bits) % 256, 7)  # TF clamps uint8 shift counts to [0, 7]
    expected = np.floor(x / 2.0**shift) * 2.0**shift
    np.testing.assert_array_equal(A.posterize(x, bits), expected.astype(np.uint8))


def test_invert():
    x = images()
    np.testing.assert_array_equal(A.invert(x), 255 - x.astype(np.int64))


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.5, 1.0, 1.9, 2.8, 3.7])
def test_brightness_is_a_blend_with_black(factor):
    x = images(n=8, h=12, w=10)
    expected, raw = trunc_blend64(np.zeros_like(x), x, factor)
    assert_matches_float64(A.brightness(x, factor), expected, raw)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.7, 1.0, 1.9, 3.7])
@pytest.mark.parametrize("hw", [(8, 8), (32, 32), (224, 16)])
def test_contrast_blends_with_pixel_count_over_256(factor, hw):
    x = images(n=2, h=hw[0], w=hw[1])
    degenerate = min(math.floor(hw[0] * hw[1] / 256), 255)  # big_vision issue #109
    expected, raw = trunc_blend64(np.full(x.shape, degenerate), x, factor)
    assert_matches_float64(A.contrast(x, factor), expected, raw)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.5, 1.9, 3.7])
def test_color_blends_with_tf_grayscale(factor):
    x = images(n=8)
    f = x.astype(np.float64) / 255.0
    grey_raw = 255.5 * (0.2989 * f[..., 0] + 0.5870 * f[..., 1] + 0.1140 * f[..., 2])
    grey = np.floor(grey_raw)[..., None]
    expected, raw = trunc_blend64(np.broadcast_to(grey, x.shape), x, factor)
    got = A.color(x, factor)
    # A grey level that float32 puts one below its float64 value shifts the blend by < 1 too.
    off_grid = np.abs(grey_raw - np.round(grey_raw)) > 1e-4
    assert_matches_float64(got[off_grid], expected[off_grid], raw[off_grid])


def test_color_is_the_identity_on_greyscale():
    g = images(c=1)
    for factor in (0.0, 0.1, 1.9, 3.7):
        np.testing.assert_array_equal(A.color(g, factor), g)


def test_autocontrast_stretches_each_channel():
    x = images(n=6, h=9, w=7)
    x[0, ..., 1] = 77  # a constant channel stays as it is
    lo = x.min(axis=(1, 2), keepdims=True).astype(np.float64)
    hi = x.max(axis=(1, 2), keepdims=True).astype(np.float64)
    raw = (x - lo) * 255.0 / np.where(hi > lo, hi - lo, 1.0)
    expected = np.where(hi > lo, np.floor(np.clip(raw, 0, 255)), x)
    assert_matches_float64(A.autocontrast(x), expected, np.where(hi > lo, raw, 0.5))
    np.testing.assert_array_equal(A.autocontrast(x)[0, ..., 1], 77)


def test_equalize_equals_pil():
    rng = np.random.default_rng(3)
    for i in range(40):
        c = 1 if i % 2 else 3
        lo, hi = sorted(rng.integers(0, 256, 2))
        x = rng.integers(lo, hi + 1, size=(7, 9, c), dtype=np.uint8)
        pil = Image.fromarray(x[..., 0] if c == 1 else x)
        expected = np.asarray(ImageOps.equalize(pil)).reshape(x.shape)
        np.testing.assert_array_equal(A.equalize(x), expected)


@pytest.mark.parametrize("factor", [0.0, 0.1, 1.9, 3.7])
def test_sharpness_blends_with_the_smooth_kernel(factor):
    x = images(n=3, h=7, w=9)
    xf = x.astype(np.float64)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    smooth_raw = np.zeros_like(xf)
    for dy in range(3):
        for dx in range(3):
            smooth_raw[:, 1:-1, 1:-1] += kernel[dy, dx] * xf[:, dy : dy + 5, dx : dx + 7]
    smooth = xf.copy()
    smooth[:, 1:-1, 1:-1] = np.floor(np.clip(smooth_raw[:, 1:-1, 1:-1], 0, 255))
    expected, raw = trunc_blend64(smooth, x, factor)
    got = A.sharpness(x, factor)
    interior_ok = np.abs(smooth_raw - np.round(smooth_raw)) > 1e-4
    interior_ok[:, [0, -1]] = True
    interior_ok[:, :, [0, -1]] = True
    assert_matches_float64(got[interior_ok], expected[interior_ok], raw[interior_ok])
    np.testing.assert_array_equal(A.sharpness(x[:, :2], factor), x[:, :2])  # too small


# --------------------------------------------------------------------------------------------
# Geometric ops.


@pytest.mark.parametrize("pixels", [-9, -3, -1, 0, 2, 5, 100])
def test_translate_by_an_integer_shifts_and_fills_grey(pixels):
    x = images(n=2, h=6, w=8)
    expected_x = np.full_like(x, 128)
    expected_y = np.full_like(x, 128)
    for col in range(8):
        if 0 <= col + pixels < 8:
            expected_x[:, :, col] = x[:, :, col + pixels]
    for row in range(6):
        if 0 <= row + pixels < 6:
            expected_y[:, row] = x[:, row + pixels]
    np.testing.assert_array_equal(A.translate_x(x, pixels), expected_x)
    np.testing.assert_array_equal(A.translate_y(x, pixels), expected_y)


def test_translate_takes_one_shift_per_image():
    x = images(n=3)
    got = A.translate_x(x, np.array([1.0, -2.0, 0.0]))
    for i, p in enumerate((1, -2, 0)):
        np.testing.assert_array_equal(got[i], A.translate_x(x[i], p))


def round_half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


@pytest.mark.parametrize("level", [0.3, -0.3, 0.45, -0.6, 0.25])
def test_shear_matches_the_affine_map(level):
    x = images(n=2, h=7, w=9)
    f32 = np.float32
    lv = f32(level)  # the kernel forms a0 x + a1 y + a2 in float32
    ex = np.full_like(x, 128)
    ey = np.full_like(x, 128)
    for r in range(7):
        for c in range(9):
            sx = int(round_half_away(float(f32(c) + lv * f32(r))))
            if 0 <= sx < 9:
                ex[:, r, c] = x[:, r, sx]
            sy = int(round_half_away(float(lv * f32(c) + f32(r))))
            if 0 <= sy < 7:
                ey[:, r, c] = x[:, sy, c]
    np.testing.assert_array_equal(A.shear_x(x, level), ex)
    np.testing.assert_array_equal(A.shear_y(x, level), ey)


def test_rotate_quarter_turns_and_zero():
    x = images(n=2, h=5, w=5)
    np.testing.assert_array_equal(A.rotate(x, 0.0), x)
    np.testing.assert_array_equal(A.rotate(x, 90.0), np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(A.rotate(x, -90.0), np.rot90(x, -1, axes=(1, 2)))
    np.testing.assert_array_equal(A.rotate(x, 180.0), x[:, ::-1, ::-1])


def test_rotate_matches_the_tfa_map_and_fills_grey():
    x = images(n=1, h=8, w=8, c=1)[0]
    got = A.rotate(x, 30.0)
    theta = float(np.float32(math.radians(30.0)))
    c, s = math.cos(theta), math.sin(theta)
    ox = (7 - (c * 7 - s * 7)) / 2
    oy = (7 - (s * 7 + c * 7)) / 2
    mismatches = 0
    for r in range(8):
        for col in range(8):
            sx, sy = c * col - s * r + ox, s * col + c * r + oy
            ix, iy = int(round_half_away(sx)), int(round_half_away(sy))
            want = x[iy, ix, 0] if 0 <= ix < 8 and 0 <= iy < 8 else 128
            mismatches += int(got[r, col, 0] != want)
    assert mismatches == 0
    assert (got == 128).sum() >= 4  # the corners are uncovered


def test_cutout_fills_the_clipped_square():
    x = images(n=2, h=8, w=10)
    for pad, cy, cx in [(2, 3, 4), (3, 0, 9), (0, 4, 4), (40, 5, 5)]:
        expected = x.copy()
        expected[:, max(cy - pad, 0) : min(cy + pad, 8), max(cx - pad, 0) : min(cx + pad, 10)] = 128
        np.testing.assert_array_equal(A.cutout(x, pad, (cy, cx)), expected)


def test_every_op_treats_grey_as_equal_rgb_channels():
    g = images(n=3, h=9, w=7, c=1, seed=5)
    rgb = np.repeat(g, 3, axis=-1)
    for name in A.RANDAUG_OPS:
        arg = A.level_to_arg(name, 7.0)
        sign, cy, cx = np.array([1.0, -1.0, 1.0]), np.array([1, 4, 8]), np.array([0, 3, 6])
        one = A.apply_op(name, g, arg, sign, cy, cx, 128)
        three = A.apply_op(name, rgb, arg, sign, cy, cx, 128)
        np.testing.assert_array_equal(three, np.repeat(one, 3, axis=-1), err_msg=name)


# --------------------------------------------------------------------------------------------
# RandAugment.

REFERENCE_ARGS = {
    # magnitude: (Rotate, Shear, Translate, Enhance, Posterize, Solarize, SolarizeAdd, Cutout)
    0: (0.0, 0.0, 0.0, 0.1, 0, 0, 0, 0),
    10: (30.0, 0.3, 100.0, 1.9, 4, 256, 110, 40),
    15: (45.0, 0.45, 150.0, 2.8, 6, 384, 165, 60),
    20: (60.0, 0.6, 200.0, 3.7, 8, 512, 220, 80),
}


@pytest.mark.parametrize("magnitude", sorted(REFERENCE_ARGS))
def test_level_to_arg_matches_the_reference(magnitude):
    rot, shear, trans, enhance, post, sol, sol_add, cut = REFERENCE_ARGS[magnitude]
    arg = lambda name: A.level_to_arg(name, magnitude)  # noqa: E731
    assert arg("Rotate") == pytest.approx(rot)
    assert arg("ShearX") == arg("ShearY") == pytest.approx(shear)
    assert arg("TranslateX") == arg("TranslateY") == pytest.approx(trans)
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert arg(name) == pytest.approx(enhance)
    assert (arg("Posterize"), arg("Solarize"), arg("SolarizeAdd"), arg("Cutout")) == (
        post,
        sol,
        sol_add,
        cut,
    )
    assert arg("AutoContrast") is arg("Equalize") is arg("Invert") is None
    assert A.level_to_arg("TranslateX", 10, translate_const=3.5) == pytest.approx(3.5)
    assert A.level_to_arg("Cutout", 10, cutout_const=2) == 2


def test_reference_constants():
    assert A.RANDAUG_OPS == (
        "AutoContrast",
        "Equalize",
        "Invert",
        "Rotate",
        "Posterize",
        "Solarize",
        "Color",
        "Contrast",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Cutout",
        "SolarizeAdd",
    )
    assert A.NEGATED_OPS == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    assert (A.RANDAUG_TRANSLATE_CONST, A.RANDAUG_CUTOUT_CONST, A.RANDAUG_REPLACE) == (100, 40, 128)
    assert A.INCEPTION_AREA_RANGE == (0.05, 1.0) and A.INCEPTION_ASPECT_RANGE == (0.75, 1.33)


def test_rand_augment_applies_the_documented_draws():
    x = images(n=12, h=8, w=8, c=1, seed=2)
    layers, magnitude = 3, 10
    got = A.rand_augment(x, np.random.default_rng(11), layers, magnitude, translate_const=3)
    rng = np.random.default_rng(11)
    ops = rng.integers(0, 16, size=(12, layers))
    negate = rng.random((12, layers)) < 0.5
    cys, cxs = rng.integers(0, 8, size=(12, layers)), rng.integers(0, 8, size=(12, layers))
    for i in range(12):
        img = x[i]
        for layer in range(layers):
            name = A.RANDAUG_OPS[ops[i, layer]]
            arg = A.level_to_arg(name, magnitude, translate_const=3)
            if name in A.NEGATED_OPS and negate[i, layer]:
                arg = -arg
            if name == "Cutout":
                img = A.cutout(img, arg, (cys[i, layer], cxs[i, layer]))
            else:
                img = A.apply_op(name, img[None], arg, 1.0, 0, 0, 128)[0]
        np.testing.assert_array_equal(got[i], img, err_msg=f"image {i}")


def test_rand_augment_is_deterministic_and_keeps_shape():
    x = images(n=16, h=8, w=8, c=1)
    a = A.rand_augment(x, np.random.default_rng(0), 2, 15)
    b = A.rand_augment(x, np.random.default_rng(0), 2, 15)
    c = A.rand_augment(x, np.random.default_rng(1), 2, 15)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(A.rand_augment(x, np.random.default_rng(0), 0, 10), x)
    single = A.rand_augment(x[0], np.random.default_rng(0), 2, 15)
    assert single.shape == x[0].shape
    assert not np.array_equal(A.rand_augment(x, np.random.default_rng(0), 2, 0), x)  # light1


def test_rand_augment_rejects_bad_arguments():
    x = images()
    with pytest.raises(ValueError, match="uint8"):
        A.rand_augment(x.astype(np.float32), np.random.default_rng(0), 2, 10)
    with pytest.raises(ValueError, match="num_layers"):
        A.rand_augment(x, np.random.default_rng(0), -1, 10)
    with pytest.raises(ValueError, match="magnitude"):
        A.rand_augment(x, np.random.default_rng(0), 2, -1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        A.rand_augment(images(c=2), np.random.default_rng(0), 2, 10)
    with pytest.raises(ValueError, match="accepted"):
        A.level_to_arg("Blur", 10)
    with pytest.raises(ValueError, match="Generator"):
        A.rand_augment(x, 0, 2, 10)
    with pytest.raises(ValueError, match="Generator"):
        A.augment_batch(x, np.random.RandomState(0), flip=True)


# --------------------------------------------------------------------------------------------
# Crops.


@pytest.mark.parametrize("hw", [(224, 224), (8, 8), (32, 48)])
def test_crop_boxes_stay_in_the_reference_ranges(hw):
    h, w = hw
    boxes = A.sample_crop_boxes(np.random.default_rng(0), 20_000, h, w)
    y, x, bh, bw = boxes.T
    area = bh * bw / (h * w)
    assert area.min() >= 0.05 - 1e-6 and area.max() <= 1.0
    # The realised ratio is rint(h r) / h for r in [0.75, 1.33]: off by at most 0.5 / h.
    ratio = bw / bh
    assert np.all(ratio >= 0.75 - 0.5 / bh - 1e-9) and np.all(ratio <= 1.33 + 0.5 / bh + 1e-9)
    assert np.all(y >= 0) and np.all(x >= 0)
    # TF's offsets are drawn from [0, H - h): a shorter crop never touches the bottom edge.
    assert np.all(np.where(bh < h, y + bh < h, y == 0))
    assert np.all(np.where(bw < w, x + bw < w, x == 0))
    if h == 224:
        # TF draws the ratio, then the height uniformly (not the area, as torchvision does):
        # the continuous model's mean area fraction, by Monte Carlo with another generator.
        mc = np.random.default_rng(123)
        r = mc.uniform(0.75, 1.33, 400_000)
        side = mc.uniform(np.sqrt(0.05 / r), np.minimum(1.0, 1.0 / r))  # height / H
        assert abs(np.mean(area) - np.mean(side**2 * r)) < 0.01
        assert abs(np.mean(ratio) - 1.04) < 0.01


def test_crop_box_falls_back_to_the_whole_image():
    # No box of area in [0.2, 0.2] pixels exists in a 2x2 image.
    assert A.sample_crop_box(np.random.default_rng(0), 2, 2, area_range=(0.05, 0.05)) == (
        0,
        0,
        2,
        2,
    )
    with pytest.raises(ValueError, match="area_range"):
        A.sample_crop_box(np.random.default_rng(0), 8, 8, area_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="aspect_range"):
        A.sample_crop_box(np.random.default_rng(0), 8, 8, aspect_range=(0.0, 1.0))


def test_inception_crop_resizes_the_sampled_box_with_pil_bilinear():
    x = images(n=6, h=20, w=24, c=3)
    got = A.inception_crop_batch(x, np.random.default_rng(4), (16, 12))
    boxes = A.sample_crop_boxes(np.random.default_rng(4), 6, 20, 24)
    assert got.shape == (6, 16, 12, 3) and got.dtype == np.uint8
    for i, (y, x0, h, w) in enumerate(boxes):
        crop = Image.fromarray(x[i, y : y + h, x0 : x0 + w])
        expected = np.asarray(crop.resize((12, 16), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(got[i], expected)
    g = images(n=1, h=8, w=8, c=1)[0]
    single = A.inception_crop(g, np.random.default_rng(1), 8)
    assert single.shape == (8, 8, 1)
    np.testing.assert_array_equal(single, A.inception_crop(g, np.random.default_rng(1), 8))
    with pytest.raises(ValueError, match="size"):
        A.inception_crop(g, np.random.default_rng(1), (8, 0))


def test_resize_center_crop():
    x = images(n=2, h=10, w=14, c=3)
    np.testing.assert_array_equal(A.resize_center_crop(x, (10, 14)), x)  # no-op
    got = A.resize_center_crop(x[0], 8)
    resized = np.asarray(Image.fromarray(x[0]).resize((11, 8), Image.Resampling.BOX))  # 14*0.8
    np.testing.assert_array_equal(got, resized[:, 1:9])
    got = A.resize_center_crop(x, (6, 6), resize_size=10)
    np.testing.assert_array_equal(got, x[:, 2:8, 4:10])
    with pytest.raises(ValueError, match="does not fit"):
        A.resize_center_crop(x, (12, 12), resize_size=10)


# --------------------------------------------------------------------------------------------
# The batch transform.


def test_augment_batch_composes_crop_flip_randaug_in_order():
    x = images(n=10, h=8, w=8, c=1)
    kw = dict(inception_crop_size=8, flip=True, randaug=(2, 10), translate_const=2)
    got = A.augment_batch(x, np.random.default_rng(5), **kw)
    rng = np.random.default_rng(5)
    expected = A.inception_crop_batch(x, rng, 8)
    flips = rng.random(10) < 0.5
    expected = np.where(flips[:, None, None, None], expected[:, :, ::-1], expected)
    expected = A.rand_augment(expected, rng, 2, 10, translate_const=2)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.uint8 and got.flags.c_contiguous


def test_augment_batch_determinism_shapes_and_no_op():
    x = images(n=8, h=32, w=32, c=3)
    kw = dict(inception_crop_size=(16, 24), flip=True, randaug=(2, 15))
    a = A.augment_batch(x, np.random.default_rng([3, 7, 1]), **kw)
    b = A.augment_batch(x, np.random.default_rng([3, 7, 1]), **kw)
    c = A.augment_batch(x, np.random.default_rng([3, 8, 1]), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (8, 16, 24, 3) and a.dtype == np.uint8
    same = A.augment_batch(x, np.random.default_rng(0))
    np.testing.assert_array_equal(same, x)
    assert same is not x
    flipped = A.augment_batch(x, np.random.default_rng(0), flip=True)
    for i in range(8):
        assert np.array_equal(flipped[i], x[i]) or np.array_equal(flipped[i], x[i, :, ::-1])
    with pytest.raises(ValueError, match="randaug"):
        A.augment_batch(x, np.random.default_rng(0), randaug=2)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        A.augment_batch(x[0], np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Mixup.


def test_mixup_is_a_convex_combination_with_the_rolled_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 0]]
    mixed_x, mixed_y = A.mixup(x, labels, np.random.default_rng(9), 0.2)
    a = max(np.random.default_rng(9).beta(0.2, 0.2), 1 - np.random.default_rng(9).beta(0.2, 0.2))
    assert a >= 0.5
    np.testing.assert_allclose(mixed_x, a * x + (1 - a) * np.roll(x, 1, axis=0), rtol=1e-6)
    np.testing.assert_allclose(mixed_y, a * labels + (1 - a) * np.roll(labels, 1, axis=0))
    np.testing.assert_allclose(mixed_y.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(mixed_y.max(axis=1) >= 0.5 - 1e-6)
    assert mixed_x.dtype == np.float32 and mixed_y.dtype == np.float32


def test_mixup_coefficient_is_at_least_one_half_and_alpha_zero_is_identity():
    x = np.zeros((2, 3), np.float32)
    y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    rng = np.random.default_rng(1)
    for alpha in (0.2, 0.5, 0.8):
        for _ in range(50):
            _, my = A.mixup(x, y, rng, alpha)
            assert my[0, 0] >= 0.5 and my[0, 0] == pytest.approx(my[1, 1])
    same_x, same_y = A.mixup(x, y, rng, 0.0)
    np.testing.assert_array_equal(same_y, y)
    assert same_y is not y
    with pytest.raises(ValueError, match="alpha"):
        A.mixup(x, y, rng, -1.0)
    with pytest.raises(ValueError, match="batch size"):
        A.mixup(x[:1], y, rng, 0.2)
    with pytest.raises(ValueError, match="float"):
        A.mixup(x, np.array([0, 1]), rng, 0.2)


# --------------------------------------------------------------------------------------------
# The AugReg settings.


def test_augreg_settings_table():
    table = {
        name: (s.randaug, s.mixup_alpha, s.dropout_rate, s.stochastic_depth_rate)
        for name, s in A.AUGREG_SETTINGS.items()
    }
    assert table == {
        "none": (None, 0.0, 0.0, 0.0),
        "light1": ((2, 0), 0.0, 0.0, 0.0),
        "light2": ((2, 10), 0.2, 0.0, 0.0),
        "medium1": ((2, 15), 0.2, 0.0, 0.0),
        "medium2": ((2, 15), 0.5, 0.0, 0.0),
        "strong1": ((2, 20), 0.5, 0.0, 0.0),
        "strong2": ((2, 20), 0.8, 0.0, 0.0),
    }
    reg = A.augreg_setting("medium2", regularized=True)
    assert (reg.dropout_rate, reg.stochastic_depth_rate, reg.randaug) == (0.1, 0.1, (2, 15))
    assert A.augreg_setting("light1") is A.AUGREG_SETTINGS["light1"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        A.AUGREG_SETTINGS["none"].mixup_alpha = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="accepted: \\['none', 'light1'"):
        A.augreg_setting("heavy")

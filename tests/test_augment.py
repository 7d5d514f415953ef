import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from msvq import augment
from msvq.augment import (
    LINEAR_TRAIN,
    STRONG,
    WEAK,
    CropBoxes,
    ViewParams,
    apply_view,
    linear_train_view,
    sample_crop_boxes,
    sample_view_params,
    strong_view,
    weak_view,
)

GRAY_MEAN = (0.5, 0.5, 0.5)
GRAY_STD = (0.25, 0.25, 0.25)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _random_images(batch, size=16, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, channels), dtype=torch.uint8, generator=generator)


def _horizontal_ramp(batch, size=16, channels=3):
    """Images whose intensity rises from left to right (64 to 64 + 6*(size-1))."""
    ramp = (64 + 6 * torch.arange(size)).to(torch.uint8)
    return ramp.view(1, 1, size, 1).expand(batch, size, size, channels).contiguous()


def _float_images(batch, size=12, seed=0):
    return augment._to_float(_random_images(batch, size=size, seed=seed))


def _denormalise(x, mean, std):
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def _assert_rate(mask, expected, tolerance):
    rate = mask.float().mean().item()
    assert abs(rate - expected) < tolerance, f"rate {rate:.4f}, expected {expected} +- {tolerance}"


# Crop boxes.


def test_crop_boxes_respect_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 1000, 1000, scale=(0.2, 1.0), generator=generator)
    height, width = boxes.height.double(), boxes.width.double()

    # On a 1000 px image rounding to whole pixels moves area and ratio by well under 1%.
    area_fraction = height * width / 1e6
    aspect = width / height
    assert area_fraction.min() >= 0.2 * 0.99
    assert area_fraction.max() <= 1.0
    assert aspect.min() >= 3 / 4 * 0.99
    assert aspect.max() <= 4 / 3 * 1.01
    # Both ends of each range are reached, so the ranges are not narrower than asked.
    assert area_fraction.min() < 0.21
    assert area_fraction.max() > 0.95
    assert aspect.min() < 0.76
    assert aspect.max() > 1.31


def test_crop_boxes_lie_inside_image():
    generator = torch.Generator().manual_seed(1)
    boxes = sample_crop_boxes(20000, 32, 24, scale=(0.08, 1.0), generator=generator)

    assert boxes.top.min() >= 0
    assert boxes.left.min() >= 0
    assert (boxes.top + boxes.height).max() <= 32
    assert (boxes.left + boxes.width).max() <= 24
    assert boxes.height.min() >= 1
    assert boxes.width.min() >= 1
    assert boxes.top.dtype == torch.int64


def test_crop_offsets_uniform():
    generator = torch.Generator().manual_seed(2)
    # Area fraction 1/4 and ratio 1 give a 4x4 box, which has 5 positions per axis on 8x8.
    boxes = sample_crop_boxes(20000, 8, 8, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=generator)

    assert torch.equal(boxes.height.unique(), torch.tensor([4]))
    counts = torch.bincount(boxes.top, minlength=5).double() / 20000
    assert counts.shape == (5,)
    torch.testing.assert_close(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.015, rtol=0)
    counts = torch.bincount(boxes.left, minlength=5).double() / 20000
    torch.testing.assert_close(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.015, rtol=0)


def test_crop_boxes_fall_back_to_central_crop():
    # A square box of the full image area (round(sqrt(200)) = 14 px) never fits in a 10x20
    # image, so every sample takes torchvision's fallback: the central 10x10 square.
    boxes = sample_crop_boxes(50, 10, 20, scale=(1.0, 1.0), ratio=(1.0, 1.0))

    assert torch.equal(boxes.height, torch.full((50,), 10))
    assert torch.equal(boxes.width, torch.full((50,), 10))
    assert torch.equal(boxes.top, torch.zeros(50, dtype=torch.long))
    assert torch.equal(boxes.left, torch.full((50,), 5))


def test_crop_boxes_differ_per_sample():
    boxes = sample_crop_boxes(64, 32, 32, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(3))
    distinct = {tuple(row) for row in torch.stack([boxes.top, boxes.left, boxes.height, boxes.width], 1).tolist()}

    assert len(distinct) > 48


# Parameter rates.


def test_strong_params_rates():
    params = sample_view_params(STRONG, 20000, 32, 32, generator=torch.Generator().manual_seed(4))

    # Binomial standard deviations at n = 20000 are at most 0.0036; tolerances are about 4 of them.
    _assert_rate(params.flip, 0.5, 0.015)
    _assert_rate(params.jitter, 0.8, 0.015)
    _assert_rate(params.grayscale, 0.2, 0.015)
    _assert_rate(params.blur, 0.5, 0.015)
    # Independent draws: flips do not line up with blurs.
    _assert_rate(params.flip & params.blur, 0.25, 0.015)


def test_strong_params_ranges():
    params = sample_view_params(STRONG, 20000, 32, 32, generator=torch.Generator().manual_seed(5))
    brightness, contrast, saturation, hue = params.jitter_factors.unbind(dim=1)

    for factor in (brightness, contrast, saturation):
        assert factor.min() >= 0.6
        assert factor.max() <= 1.4
        assert factor.min() < 0.61
        assert factor.max() > 1.39
    assert hue.abs().max() <= 0.1
    assert hue.min() < -0.099
    assert params.blur_sigma.min() >= 0.1
    assert params.blur_sigma.max() <= 2.0
    # Every row of the order is a permutation of the four adjustments.
    assert torch.equal(params.jitter_order.sort(dim=1).values, torch.arange(4).expand(20000, 4))
    # The first adjustment is each of the four a quarter of the time.
    first = torch.bincount(params.jitter_order[:, 0], minlength=4).double() / 20000
    torch.testing.assert_close(first, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015, rtol=0)


def test_weak_and_linear_params_rates():
    weak = sample_view_params(WEAK, 20000, 32, 32, generator=torch.Generator().manual_seed(6))
    linear = sample_view_params(LINEAR_TRAIN, 20000, 32, 32, generator=torch.Generator().manual_seed(7))

    _assert_rate(weak.flip, 0.9, 0.01)
    _assert_rate(linear.flip, 0.5, 0.015)
    for params in (weak, linear):
        assert params.jitter is None
        assert params.grayscale is None
        assert params.blur is None
    assert (linear.boxes.height * linear.boxes.width).min() < 0.1 * 32 * 32


# Output rates.


@pytest.mark.parametrize(("view", "flip_rate"), [(strong_view, 0.5), (weak_view, 0.9), (linear_train_view, 0.5)])
def test_view_flip_rate_in_output(view, flip_rate):
    images = _horizontal_ramp(4000, size=16)

    out = view(images, 8, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(8))

    # Unflipped crops keep the ramp rising to the right; flipped ones fall.
    slope = out[:, 0, :, -1].mean(dim=1) - out[:, 0, :, 0].mean(dim=1)
    assert (slope != 0).all()
    _assert_rate(slope < 0, flip_rate, 0.03)


def test_strong_view_grayscale_rate_in_output():
    images = _random_images(4000, size=8, seed=9)

    out = strong_view(images, 8, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(10))

    # With equal mean and std per channel, only grayscale makes the three channels equal.
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    _assert_rate(gray, 0.2, 0.03)


# Each step against torchvision.


def test_full_image_crop_equals_resize():
    images = _random_images(3, size=16, seed=11)
    boxes = CropBoxes(
        top=torch.zeros(3, dtype=torch.long),
        left=torch.zeros(3, dtype=torch.long),
        height=torch.full((3,), 16),
        width=torch.full((3,), 16),
    )
    flip = torch.tensor([False, True, False])

    out = apply_view(images, ViewParams(boxes=boxes, flip=flip), 24, GRAY_MEAN, GRAY_STD)

    resized = TF.resize(augment._to_float(images), [24, 24], antialias=False)
    expected = TF.normalize(resized, GRAY_MEAN, GRAY_STD)
    expected[1] = TF.hflip(expected[1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unscaled_crop_equals_slice():
    images = _random_images(2, size=20, seed=12)
    boxes = CropBoxes(
        top=torch.tensor([3, 0]),
        left=torch.tensor([5, 12]),
        height=torch.tensor([8, 8]),
        width=torch.tensor([8, 8]),
    )
    flip = torch.tensor([False, True])

    out = augment.resized_crop(augment._to_float(images), boxes, flip, 8)

    as_float = augment._to_float(images)
    torch.testing.assert_close(out[0], as_float[0, :, 3:11, 5:13], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], as_float[1, :, 0:8, 12:20].flip(-1), atol=1e-6, rtol=0)


def test_interior_of_resized_crop_matches_torchvision():
    images = augment._to_float(_random_images(1, size=20, seed=13))
    boxes = CropBoxes(top=torch.tensor([4]), left=torch.tensor([2]), height=torch.tensor([10]), width=torch.tensor([12]))

    out = augment.resized_crop(images, boxes, torch.tensor([False]), 16)

    expected = TF.resized_crop(images, 4, 2, 10, 12, [16, 16], antialias=False)
    # Only the outermost output pixels may differ: they blend with pixels outside the box.
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision():
    x = _float_images(4)

    expected = TF.rgb_to_grayscale(x, num_output_channels=1)

    torch.testing.assert_close(augment.rgb_to_grayscale(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (augment.adjust_brightness, TF.adjust_brightness),
        (augment.adjust_contrast, TF.adjust_contrast),
        (augment.adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_adjustments_match_torchvision(ours, theirs):
    x = _float_images(6, seed=14)
    factors = torch.tensor([0.6, 0.8, 1.0, 1.1, 1.25, 1.4])

    out = ours(x, factors)

    for i, factor in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], theirs(x[i], factor), atol=1e-6, rtol=0)


def test_hue_matches_torchvision():
    x = _float_images(6, seed=15)
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.07, 0.1])

    out = augment.adjust_hue(x, shifts)

    for i, shift in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shift), atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision():
    x = _float_images(4, size=16, seed=16)
    sigma = torch.tensor([0.1, 0.5, 1.2, 2.0])

    out = augment.gaussian_blur(x, sigma, kernel_size=5)

    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [s, s]), atol=1e-6, rtol=0)


def test_color_jitter_follows_per_sample_order():
    params = sample_view_params(STRONG, 8, 12, 12, generator=torch.Generator().manual_seed(17))
    x = _float_images(8, seed=18)
    adjustments = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    out = augment.color_jitter(x, params.jitter_factors, params.jitter_order)

    assert len({tuple(row) for row in params.jitter_order.tolist()}) > 1
    for i in range(8):
        expected = x[i]
        for op_index in params.jitter_order[i].tolist():
            expected = adjustments[op_index](expected, params.jitter_factors[i, op_index].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_apply_view_applies_only_flagged_steps():
    images = _random_images(4, size=12, seed=19)
    params = sample_view_params(STRONG, 4, 12, 12, generator=torch.Generator().manual_seed(20))
    params.jitter = torch.tensor([True, False, False, False])
    params.grayscale = torch.tensor([False, True, False, False])
    params.blur = torch.tensor([False, False, True, False])
    params.blur_sigma = torch.full((4,), 1.5)

    out = _denormalise(apply_view(images, params, 12, GRAY_MEAN, GRAY_STD), GRAY_MEAN, GRAY_STD)

    cropped = augment.resized_crop(augment._to_float(images), params.boxes, params.flip, 12)
    jittered = augment.color_jitter(cropped, params.jitter_factors, params.jitter_order)
    torch.testing.assert_close(out[0], jittered[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], augment.rgb_to_grayscale(cropped[1:2])[0].expand(3, 12, 12), atol=1e-5, rtol=0)
    blurred = TF.gaussian_blur(cropped[2], [3, 3], [1.5, 1.5])
    torch.testing.assert_close(out[2], blurred, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[3], cropped[3], atol=1e-5, rtol=0)


# Whole views.


@pytest.mark.parametrize("view", [strong_view, weak_view, linear_train_view])
@pytest.mark.parametrize("channels", [1, 3])
def test_view_output_shape_and_dtype(view, channels):
    images = _random_images(5, size=20, channels=channels)
    mean, std = (0.4,) * channels, (0.2,) * channels

    out = view(images, 16, mean, std, generator=torch.Generator().manual_seed(21))

    assert out.shape == (5, channels, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Values come from [0, 1] pixels, so they lie in [(0 - mean) / std, (1 - mean) / std].
    assert out.min() >= -2.0 - 1e-5
    assert out.max() <= 3.0 + 1e-5


def test_weak_view_constant_image():
    images = torch.full((6, 16, 16, 3), 153, dtype=torch.uint8)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)

    out = weak_view(images, 8, mean, std, generator=torch.Generator().manual_seed(22))

    expected = (153 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(6, 3, 8, 8), atol=1e-5, rtol=0)


def test_test_view_normalises_only():
    images = _random_images(3, size=8, seed=23)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.3, 0.4)

    out = augment.test_view(images, 8, mean, std)

    expected = TF.normalize(images.permute(0, 3, 1, 2).float() / 255, mean, std)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_test_view_resizes_to_crop():
    images = _random_images(2, size=16, seed=24)

    out = augment.test_view(images, 8, GRAY_MEAN, GRAY_STD)

    resized = F.interpolate(augment._to_float(images), size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, TF.normalize(resized, GRAY_MEAN, GRAY_STD), atol=1e-6, rtol=0)


def test_views_differ_per_sample():
    images = _random_images(1, size=16, seed=25).expand(16, 16, 16, 3).contiguous()

    out = strong_view(images, 16, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(26))

    flat = out.flatten(1)
    distinct_pairs = (torch.cdist(flat, flat) > 1e-3).sum().item()
    assert distinct_pairs == 16 * 15


@pytest.mark.parametrize("view", [strong_view, weak_view, linear_train_view])
def test_same_seed_gives_same_view(view):
    images = _random_images(8, size=16, seed=27)

    first = view(images, 12, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(28))
    second = view(images, 12, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(28))
    other = view(images, 12, GRAY_MEAN, GRAY_STD, generator=torch.Generator().manual_seed(29))

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("crop", "size"), [(28, 3), (32, 3), (64, 7), (96, 9), (8, 3)])
def test_blur_kernel_size(crop, size):
    assert augment.blur_kernel_size(crop) == size


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="uint8"):
        strong_view(torch.rand(2, 8, 8, 3), 8, GRAY_MEAN, GRAY_STD)
    with pytest.raises(ValueError, match="uint8"):
        weak_view(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 8, GRAY_MEAN, GRAY_STD)
    with pytest.raises(ValueError, match="3 values"):
        augment.test_view(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 8, (0.5,), (0.5,))


def test_hue_whole_turns_are_identity():
    x = _float_images(4, seed=30)

    torch.testing.assert_close(augment.adjust_hue(x, torch.zeros(4)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.adjust_hue(x, torch.ones(4)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(augment.adjust_hue(x, -torch.ones(4)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("adjust", "low", "high"),
    [(augment.adjust_brightness, 0.6, 1.4), (augment.adjust_contrast, 0.6, 1.4),
     (augment.adjust_saturation, 0.6, 1.4), (augment.adjust_hue, -0.1, 0.1)],
)
def test_cpu_sample_subset_matches_whole_batch_where(adjust, low, high):
    # The CPU path adjusts only the selected samples; other devices adjust all and use torch.where.
    x = _float_images(8, seed=31)
    factors = low + (high - low) * torch.rand(8, generator=torch.Generator().manual_seed(32))
    masks = [torch.tensor([True, False, False, True, True, False, True, False]),
             torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)]

    for mask in masks:
        expected = torch.where(mask.view(-1, 1, 1, 1), adjust(x, factors), x)
        out = augment._replace_samples_(x.clone(), mask, adjust, factors)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0, msg=f"mask {mask.tolist()}")

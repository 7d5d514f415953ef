"""Batched data augmentation of uint8 image batches on the batch's own device.

Every sample gets its own random parameters, and the batch goes through each step as
one set of tensor operations, with no Python loop over images. A view is made in two
stages: `sample_view_params` draws the per-sample parameters, and `apply_view` crops,
flips, resizes, colours, blurs and normalises. On a CPU, each colour adjustment,
grayscale and blur runs on only the samples that drew it. On a GPU every step runs on
the whole batch, which avoids waiting for the host to find those samples.

The reference is torchvision 0.29 applied image by image to float tensors:
RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale,
RandomApply(GaussianBlur) and Normalize. Known differences:
- Crop and resize are one bilinear `grid_sample` over the whole image, so the pixels on
  a crop's border blend with their neighbours outside the crop (torchvision crops first
  and clamps at the crop's edge). Interior pixels, and crops that are the whole image,
  match `F.interpolate(..., mode="bilinear", antialias=False)`.
- NOTE: the random crops are resampled without antialiasing, so a crop larger than the
  output (STL-10's 96 px images cropped to 64 px) aliases slightly, where PIL's and
  torchvision's antialiased resize do not.
- All steps run in float32 in [0, 1], with no rounding to uint8 between steps as a PIL
  pipeline has.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma weights, as in torchvision's rgb_to_grayscale.
_LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ViewRecipe:
    """Probabilities and ranges of the random steps that make one kind of view."""

    scale: tuple[float, float]
    flip_p: float
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)


STRONG = ViewRecipe(scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
WEAK = ViewRecipe(scale=(0.2, 1.0), flip_p=0.9)
LINEAR_TRAIN = ViewRecipe(scale=(0.08, 1.0), flip_p=0.5)


@dataclass
class CropBoxes:
    """Integer-valued crop boxes in input pixels, each tensor (B,) int64."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


@dataclass
class ViewParams:
    """Per-sample random parameters of one view of a batch of B images.

    A step's fields are None when its recipe probability is zero. jitter_factors (B, 4)
    contains the brightness, contrast and saturation factors and the hue shift.
    jitter_order (B, 4) is a permutation of 0..3 per row, in that same op numbering.
    """

    boxes: CropBoxes
    flip: Tensor
    jitter: Tensor | None = None
    jitter_factors: Tensor | None = None
    jitter_order: Tensor | None = None
    grayscale: Tensor | None = None
    blur: Tensor | None = None
    blur_sigma: Tensor | None = None

    def select(self, index: Tensor) -> "ViewParams":
        """Return the parameters of the samples at ``index`` (int64, on any device), in that order."""
        index = index.to(self.flip.device)

        def rows(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.index_select(0, index)

        boxes = CropBoxes(**{field.name: rows(getattr(self.boxes, field.name)) for field in fields(CropBoxes)})
        rest = {field.name: rows(getattr(self, field.name)) for field in fields(self) if field.name != "boxes"}
        return ViewParams(boxes=boxes, **rest)


def strong_view(
    x: Tensor, crop: int, mean: Sequence[float], std: Sequence[float], generator: torch.Generator | None = None
) -> Tensor:
    """Make the student view: crop (scale 0.2-1), flip p=0.5, jitter p=0.8, grayscale p=0.2, blur p=0.5.

    x is uint8 (B, H, W, C) with C = 1 or 3. The result is normalised float32 (B, C, crop, crop).
    """
    return random_view(x, STRONG, crop, mean, std, generator)


def weak_view(
    x: Tensor, crop: int, mean: Sequence[float], std: Sequence[float], generator: torch.Generator | None = None
) -> Tensor:
    """Make a teacher view: crop (scale 0.2-1), flip p=0.9, normalise."""
    return random_view(x, WEAK, crop, mean, std, generator)


def linear_train_view(
    x: Tensor, crop: int, mean: Sequence[float], std: Sequence[float], generator: torch.Generator | None = None
) -> Tensor:
    """Make the linear-evaluation training view: crop (scale 0.08-1), flip p=0.5, normalise."""
    return random_view(x, LINEAR_TRAIN, crop, mean, std, generator)


def test_view(x: Tensor, crop: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalise a uint8 (B, H, W, C) batch, resizing the whole image to crop x crop first
    (bilinear, antialiased) when it is not that size already.
    """
    _check_images(x, mean, std)
    images = _to_float(x)
    if images.shape[-2:] != (crop, crop):
        images = F.interpolate(images, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)
    return normalize(images, mean, std)


def random_view(
    x: Tensor,
    recipe: ViewRecipe,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
    rows: Tensor | None = None,
    total: int | None = None,
) -> Tensor:
    """Make one view of a uint8 (B, H, W, C) batch with fresh random parameters per sample.

    With ``rows`` (int64 indices), x contains those rows of a batch of ``total`` images.
    The parameters are then drawn for all ``total`` images and those of ``rows`` applied,
    so each image gets the view it would get in the whole batch. Processes that split
    one batch use this to make the views that a single process would make.
    """
    _check_images(x, mean, std)
    batch, height, width, _ = x.shape
    if rows is None:
        params = sample_view_params(recipe, batch, height, width, generator=generator, device=x.device)
    else:
        params = sample_view_params(recipe, total, height, width, generator=generator, device=x.device)
        params = params.select(rows)
    return apply_view(x, params, crop, mean, std)


# Parameter sampling.


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    tries: int = 10,
) -> CropBoxes:
    """Sample RandomResizedCrop boxes, one per sample.

    This follows torchvision's RandomResizedCrop.get_params. Each sample draws `tries`
    candidates with area fraction uniform in `scale` and log aspect ratio uniform in
    log(`ratio`), rounded to whole pixels. The first candidate that fits the image is
    placed at a uniform random offset. A sample with no fitting candidate gets
    torchvision's fallback, the largest central crop whose aspect ratio lies in `ratio`.
    All tries are drawn at once, so the boxes have torchvision's distribution but not its
    random stream.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_area = area * _uniform((batch, tries), scale, generator, device)
    aspect = torch.exp(_uniform((batch, tries), log_ratio, generator, device))
    crop_width = torch.round(torch.sqrt(target_area * aspect))
    crop_height = torch.round(torch.sqrt(target_area / aspect))

    fits = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    # argmax returns the first maximal index, so this is the first try that fits (0 if none).
    first_fit = fits.int().argmax(dim=1, keepdim=True)
    crop_width = crop_width.gather(1, first_fit).squeeze(1).long()
    crop_height = crop_height.gather(1, first_fit).squeeze(1).long()

    any_fit = fits.any(dim=1)
    fallback_height, fallback_width = _central_fallback_size(height, width, ratio)
    crop_height = torch.where(any_fit, crop_height, fallback_height)
    crop_width = torch.where(any_fit, crop_width, fallback_width)

    top = _uniform_integer(height - crop_height + 1, generator)
    left = _uniform_integer(width - crop_width + 1, generator)
    top = torch.where(any_fit, top, (height - crop_height) // 2)
    left = torch.where(any_fit, left, (width - crop_width) // 2)
    return CropBoxes(top=top, left=left, height=crop_height, width=crop_width)


def sample_view_params(
    recipe: ViewRecipe,
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParams:
    """Draw every random parameter of one view for a batch of `batch` images of height x width."""
    boxes = sample_crop_boxes(batch, height, width, recipe.scale, recipe.ratio, generator, device)
    params = ViewParams(boxes=boxes, flip=_bernoulli(batch, recipe.flip_p, generator, device))

    if recipe.jitter_p > 0:
        params.jitter = _bernoulli(batch, recipe.jitter_p, generator, device)
        factor_ranges = [
            (max(0.0, 1 - recipe.brightness), 1 + recipe.brightness),
            (max(0.0, 1 - recipe.contrast), 1 + recipe.contrast),
            (max(0.0, 1 - recipe.saturation), 1 + recipe.saturation),
            (-recipe.hue, recipe.hue),
        ]
        params.jitter_factors = torch.stack(
            [_uniform((batch,), bounds, generator, device) for bounds in factor_ranges], dim=1
        )
        # The argsort of i.i.d. uniforms is a uniformly random permutation per row.
        params.jitter_order = torch.rand(batch, 4, generator=generator, device=device).argsort(dim=1)

    if recipe.grayscale_p > 0:
        params.grayscale = _bernoulli(batch, recipe.grayscale_p, generator, device)

    if recipe.blur_p > 0:
        params.blur = _bernoulli(batch, recipe.blur_p, generator, device)
        params.blur_sigma = _uniform((batch,), recipe.blur_sigma, generator, device)

    return params


# Applying the parameters.


def apply_view(x: Tensor, params: ViewParams, crop: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Crop, flip, resize, colour, blur and normalise a uint8 (B, H, W, C) batch.

    Returns float32 (B, C, crop, crop). Single-channel inputs skip saturation, hue and
    grayscale, which do nothing to a gray image.
    """
    _check_images(x, mean, std)
    images = resized_crop(_to_float(x), params.boxes, params.flip, crop)
    channels = images.shape[1]

    # images is a new tensor, so the steps below may overwrite its samples in place.
    if params.jitter is not None:
        images = _color_jitter_(images, params.jitter_factors, params.jitter_order, params.jitter)

    if params.grayscale is not None and channels == 3:
        images = _replace_samples_(images, params.grayscale, lambda x: rgb_to_grayscale(x).expand_as(x))

    if params.blur is not None:
        kernel_size = blur_kernel_size(crop)
        images = _replace_samples_(images, params.blur, lambda x, sigma: gaussian_blur(x, sigma, kernel_size),
                                   params.blur_sigma)

    return normalize(images, mean, std)


def resized_crop(x: Tensor, boxes: CropBoxes, flip: Tensor, crop: int) -> Tensor:
    """Resample each box of float x (B, C, H, W) to crop x crop, mirrored where flip is True.

    One affine sampling grid per sample maps the output's pixel centres into the box
    (align_corners False convention), which is bilinear resizing of the box followed by a
    horizontal flip.
    """
    height, width = x.shape[-2:]
    top, left, box_height, box_width = (t.to(x.dtype) for t in (boxes.top, boxes.left, boxes.height, boxes.width))

    scale_x = box_width / width
    scale_y = box_height / height
    center_x = (2 * left + box_width) / width - 1
    center_y = (2 * top + box_height) / height - 1
    scale_x = torch.where(flip, -scale_x, scale_x)

    # Output pixel centres in [-1, 1]. The grid's x coordinate depends only on the column
    # and its y coordinate only on the row, so broadcasting builds the grid that
    # F.affine_grid would compute with a batched matrix product, at a fraction of the cost.
    steps = (2 * torch.arange(crop, dtype=x.dtype, device=x.device) + 1) / crop - 1
    grid_x = scale_x.view(-1, 1, 1) * steps.view(1, 1, -1) + center_x.view(-1, 1, 1)
    grid_y = scale_y.view(-1, 1, 1) * steps.view(1, -1, 1) + center_y.view(-1, 1, 1)
    grid = torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Compute the luma (B, 1, H, W) of float RGB x (B, 3, H, W). A (B, 1, H, W) input is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale float x (B, C, H, W) in [0, 1] by a per-sample factor (B,) and clamp to [0, 1]."""
    # Blending with a black image, as torchvision does, adds exact zeros to factor * x.
    return (x * factor.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale version by a per-sample factor (B,)."""
    gray_mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, gray_mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each RGB image with its grayscale version by a per-sample factor (B,)."""
    if x.shape[1] == 1:
        return x
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of RGB x (B, 3, H, W) in [0, 1] by a per-sample shift (B,) in turns.

    Value V (the max channel) and chroma C (max minus min) stay as they are. With the
    rotated hue h in sixths of a turn, channel n (5, 3, 1 for red, green, blue) becomes
    V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, the closed form of HSV to
    RGB. This equals torchvision's round trip through HSV up to float rounding.
    """
    if x.shape[1] == 1:
        return x
    red, green, blue = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    # Gray pixels (chroma 0) get hue 0 * (1 / tiny) = 0, and their output is V whatever the hue.
    inverse_chroma = chroma.clamp_min(torch.finfo(x.dtype).tiny).reciprocal_()

    # Hue in sixths of a turn, from whichever channel is the maximum (red first on ties).
    hue = torch.where(
        value == red,
        (green - blue) * inverse_chroma,
        torch.where(value == green, 2 + (blue - red) * inverse_chroma, 4 + (red - green) * inverse_chroma),
    )
    hue = (hue + 6 * shift.to(x.dtype).view(-1, 1, 1)).unsqueeze(1)

    n = (5 - 2 * torch.arange(3, dtype=x.dtype, device=x.device)).view(1, 3, 1, 1)
    k = torch.remainder(n + hue, 6)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, jitter: Tensor | None = None) -> Tensor:
    """Apply brightness, contrast, saturation and hue to float x (B, C, H, W) in a per-sample order.

    factors is (B, 4) and order (B, 4), as in ViewParams. At each of the four positions,
    each adjustment goes to the samples whose order names it there. Samples where the
    mask ``jitter`` (B,) is False are returned unchanged. x itself is left as it is.
    """
    return _color_jitter_(x.clone(), factors, order, jitter)


def _color_jitter_(x: Tensor, factors: Tensor, order: Tensor, jitter: Tensor | None) -> Tensor:
    """Apply color_jitter, overwriting x in place on a CPU."""
    adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        for op_index, adjust in enumerate(adjustments):
            selected = order[:, position] == op_index
            if jitter is not None:
                selected &= jitter
            x = _replace_samples_(x, selected, adjust, factors[:, op_index])
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur float x (B, C, H, W) with a per-sample Gaussian of standard deviation sigma (B,).

    The separable kernel is exp(-d^2 / (2 sigma^2)) at integer offsets d within
    kernel_size // 2, normalised to sum 1, with reflect padding, as torchvision's
    gaussian_blur computes it.
    """
    height, width = x.shape[-2:]
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    taps = [kernel[:, i].view(-1, 1, 1, 1) for i in range(kernel_size)]

    # Each pass sums kernel_size shifted copies of the padded image, weighted per sample.
    # For kernels this small that is faster on a CPU than a depthwise convolution.
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    rows = taps[0] * padded[..., :width]
    for i in range(1, kernel_size):
        rows.addcmul_(taps[i], padded[..., i : i + width])
    padded = F.pad(rows, (0, 0, pad, pad), mode="reflect")
    out = taps[0] * padded[..., :height, :]
    for i in range(1, kernel_size):
        out.addcmul_(taps[i], padded[..., i : i + height, :])
    return out


def blur_kernel_size(crop: int) -> int:
    """Blur kernel size: about 10% of the crop, odd, at least 3."""
    size = max(3, int(0.1 * crop))
    return size if size % 2 == 1 else size + 1


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Subtract the per-channel mean and divide by the per-channel std, both in [0, 1] units."""
    mean_tensor, std_tensor = _channel_constants(tuple(mean), tuple(std), x.device)
    return (x - mean_tensor) / std_tensor


# Helpers.


def _check_images(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected a uint8 batch of shape (B, H, W, C) with C = 1 or 3, "
            f"got dtype {x.dtype} and shape {tuple(x.shape)}"
        )
    channels = x.shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values for {channels}-channel images, got {mean} and {std}")


def _to_float(x: Tensor) -> Tensor:
    """Convert uint8 (B, H, W, C) to float32 (B, C, H, W) in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255)


@lru_cache(maxsize=32)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    # Cached so that a CUDA batch copies its constants to the device (a blocking copy) once.
    mean_tensor = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean_tensor, std_tensor


def _central_fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """Return (height, width) of the largest central crop whose aspect ratio (width / height) lies in ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def _uniform(
    shape: tuple[int, ...],
    bounds: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _uniform_integer(upper: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw a uniform integer in [0, upper) per element of an int64 tensor with upper >= 1."""
    draws = torch.rand(upper.shape, generator=generator, device=upper.device)
    # float32 rounding can turn draws * upper into upper itself, so clamp to the last value.
    return torch.minimum((draws * upper).long(), upper - 1)


def _bernoulli(batch: int, p: float, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def _per_sample(mask: Tensor) -> Tensor:
    """(B,) mask to (B, 1, 1, 1) for torch.where over image batches."""
    return mask.view(-1, 1, 1, 1)


def _replace_samples_(x: Tensor, mask: Tensor, adjust, *per_sample: Tensor) -> Tensor:
    """Return x (B, ...) with each sample where mask (B,) is True replaced by its output of adjust.

    adjust(x, *per_sample) must treat every sample on its own, with per_sample tensors of
    B rows. On a CPU only the selected samples go through adjust, and their results
    overwrite x in place. Finding them (nonzero) would make a GPU wait for the host, so
    on other devices adjust runs on the whole batch and torch.where keeps the selected
    samples in a new tensor.
    """
    if x.device.type != "cpu":
        return torch.where(_per_sample(mask), adjust(x, *per_sample), x)
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return adjust(x, *per_sample)
    selected = adjust(x.index_select(0, index), *(value.index_select(0, index) for value in per_sample))
    return x.index_copy_(0, index, selected)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """Return factor * x + (1 - factor) * other, clamped to [0, 1], with a per-sample factor (B,)."""
    # One lerp kernel: on a CPU a broadcast sum of two products is several times slower (torch 2.14).
    weight = factor.to(x.dtype).view(-1, 1, 1, 1)
    return torch.lerp(other.expand_as(x), x, weight).clamp_(0, 1)

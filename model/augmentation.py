"""Training augmentation: the reference recipe's, and a cheaper translation-style one.

Both take a decoded uint8 HxWx3 image (32x32 for CIFAR-10) and a numpy Generator, and end in the
inference normalization (model/preprocessing.py), so that a batch is float32 [N, 3, 128, 128].

* `ReferenceAugmentation`, the notebook's: resize to 130, color jitter 0.2 (brightness, contrast,
  saturation in random order), random resized crop to 128 with scale 0.6-1 and ratio 3/4-4/3,
  horizontal flip, rotation up to 20 degrees (nearest, black fill). The reference also listed
  paddlex's MixupImage, which does nothing on single images outside a paddlex pipeline.
* `TranslateAugmentation`: everything at the source size (a reflect-padded random crop, a flip,
  optional random erasing), then the one resize to 128 that inference also does. About 20x less
  CPU per image than the reference's, which shares the two cores with training. Its `source`
  stops before the resize, for training's fast first layer (model/source_stem.py).

Both can first re-encode the source as JPEG at a random quality (`jpeg` is the probability), so
that the model sees the compression users upload. `cutmix_batch` then mixes whole batches of either.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from model.preprocessing import IMAGE_SIZE, RESAMPLE, to_normalized_chw

JPEG_QUALITY = (40, 95)  # the random quality of JPEG re-encoding, both ends included


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """The image as a decoder reads it back after JPEG encoding at `quality` (Pillow's 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


class _JpegReencoding:
    def __init__(self, jpeg: float):
        if not 0.0 <= jpeg <= 1.0:
            raise ValueError(f"jpeg re-encoding probability {jpeg} is not in [0, 1]")
        self.jpeg = jpeg

    def _maybe_jpeg(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.jpeg and rng.random() < self.jpeg:
            return jpeg_round_trip(image, rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        return image


class ReferenceAugmentation(_JpegReencoding):
    def __init__(
        self,
        resize: int = 130,
        jitter: float = 0.2,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        rotation: float = 20.0,
        jpeg: float = 0.0,
    ):
        super().__init__(jpeg)
        self.resize = resize
        self.jitter = jitter
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip = flip
        self.rotation = rotation

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = self._maybe_jpeg(image, rng)
        pil = Image.fromarray(image).resize((self.resize, self.resize), RESAMPLE)
        pil = self._jitter(pil, rng)
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE, box=self._crop_box(pil.size, rng))
        if rng.random() < self.flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rotation:
            pil = pil.rotate(rng.uniform(-self.rotation, self.rotation), Image.Resampling.NEAREST)
        return to_normalized_chw(pil)

    def _jitter(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        if not self.jitter:
            return pil
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        for i in rng.permutation(len(enhancers)):
            pil = enhancers[i](pil).enhance(rng.uniform(1 - self.jitter, 1 + self.jitter))
        return pil

    def _crop_box(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        width, height = size
        area = width * height
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side


class TranslateAugmentation(_JpegReencoding):
    """Random translation by up to `pad` source pixels (reflect padding, then a crop of the source
    size), horizontal flip, random erasing of one rectangle (probability `erasing`, 2-25% of the
    area, aspect 0.3-3.3, filled with uniform noise), then the inference resize to 128."""

    def __init__(self, pad: int = 4, flip: float = 0.5, erasing: float = 0.0, jpeg: float = 0.0):
        super().__init__(jpeg)
        if pad < 0:
            raise ValueError(f"pad {pad} is negative")
        self.pad = pad
        self.flip = flip
        self.erasing = erasing

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pil = Image.fromarray(self.source(image, rng))
        return to_normalized_chw(pil.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE))

    def source(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The augmented image at its source size (uint8 HxWx3), before the resize: what training's
        fast first layer (model/source_stem.py) reads. Draws the same random numbers as __call__."""
        image = self._maybe_jpeg(image, rng)
        height, width = image.shape[:2]
        if self.pad:
            padded = np.pad(image, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)), mode="reflect")
            top, left = rng.integers(0, 2 * self.pad + 1, size=2)
            image = padded[top : top + height, left : left + width]
        if rng.random() < self.flip:
            image = image[:, ::-1]
        if self.erasing and rng.random() < self.erasing:
            image = self._erase(image, rng)
        return np.ascontiguousarray(image)

    @staticmethod
    def _erase(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        for _ in range(10):
            area = height * width * rng.uniform(0.02, 0.25)
            ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < h < height and 0 < w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                image = image.copy()
                image[top : top + h, left : left + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                return image
        return image


AUGMENTATIONS = ("reference", "translate")


@dataclass(frozen=True)
class Mix:
    """How a batch was CutMixed: image i holds a box of image partner[i], covering 1 - lam of its
    area, so its target is lam of its own label and 1 - lam of the partner's."""

    partner: np.ndarray
    lam: float


def cutmix_batch(batch: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Mix]:
    """CutMix (Yun et al., ICCV 2019) of a batch [N, C, H, W]: one box, the same for every image,
    pasted from the batch in a random order. The box covers 1 - lam of the area for lam drawn
    uniformly (Beta(1, 1)), centred anywhere and cut by the border; lam is then the area kept."""
    n, _, height, width = batch.shape
    partner = rng.permutation(n)
    side = math.sqrt(1.0 - rng.uniform())
    h, w = int(height * side), int(width * side)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - h // 2, 0), min(cy + h - h // 2, height)
    left, right = max(cx - w // 2, 0), min(cx + w - w // 2, width)
    mixed = batch.copy()
    mixed[:, :, top:bottom, left:right] = batch[partner, :, top:bottom, left:right]
    return mixed, Mix(partner, 1.0 - (bottom - top) * (right - left) / (height * width))

"""Training augmentation, as in the reference recipe.

Resize to 130, color jitter 0.2 (brightness, contrast, saturation in random order), random
resized crop to 128 with scale 0.6-1 and ratio 3/4-4/3, horizontal flip, rotation up to 20
degrees (nearest, black fill), then the inference normalization. The reference also listed
paddlex's MixupImage, which does nothing on single images outside a paddlex pipeline.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from model.preprocessing import IMAGE_SIZE, RESAMPLE, to_normalized_chw


class TrainAugmentation:
    def __init__(
        self,
        resize: int = 130,
        jitter: float = 0.2,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        rotation: float = 20.0,
    ):
        self.resize = resize
        self.jitter = jitter
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip = flip
        self.rotation = rotation

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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

"""Training's fast first layer: AlexNet's first convolution (11x11, stride 4, padding 5) of a 32x32
image resized to 128x128, computed from the 32x32 image.

The resize to 128 (bilinear, as model/preprocessing.py does it) is linear, and four times the
source size: away from the borders, every output position of the stride-4 convolution sees the
same 4x4 source pixels through the same mix of weights. There the convolution folds with the
resize into a 4x4 convolution over the source (its weights: the 11x11 kernel through the resize's
per-axis interpolation, `FOLD`), 1/7 of the products. On the frame (output rows and columns 0, 1
and 31 of 32) the convolution's zero padding cuts the window, so it runs as it is there, over
strips of the resized image. Forward and backward equal the convolution of the resized image to
float rounding; per layer and step ~2x faster than the convolution at 128x128.

The resized image is the exact bilinear interpolation (float): Pillow's uint8 resize, which
inference runs, rounds it to a grey level (at most 0.5 / 255 apart).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from model.preprocessing import IMAGE_SIZE

SOURCE_SIZE = 32
KERNEL, STRIDE, PADDING = 11, 4, 5  # the first convolution of model/alexnet.py's stem
OUT_SIZE = (IMAGE_SIZE + 2 * PADDING - KERNEL) // STRIDE + 1  # 32
# Output positions (per axis) whose window lies inside the image: the interior, [2, 30].
INNER_FIRST = -(-PADDING // STRIDE)
INNER_LAST = (IMAGE_SIZE + PADDING - KERNEL) // STRIDE
INNER = INNER_LAST - INNER_FIRST + 1


def resize_matrix(source: int = SOURCE_SIZE, target: int = IMAGE_SIZE, padding: int = PADDING) -> np.ndarray:
    """[target + 2 * padding, source]: the bilinear resize of one axis (Pillow's triangle filter at
    output centres, weights of pixels outside the source dropped and the rest renormalized), with
    `padding` rows of zeros either side: the convolution's zero padding."""
    matrix = np.zeros((target + 2 * padding, source), np.float64)
    scale = source / target
    for i in range(target):
        centre = (i + 0.5) * scale
        weights = {j: max(0.0, 1.0 - abs(j + 0.5 - centre)) for j in range(int(centre) - 1, int(centre) + 2)}
        weights = {j: w for j, w in weights.items() if 0 <= j < source and w > 0}
        total = sum(weights.values())
        for j, w in weights.items():
            matrix[padding + i, j] = w / total
    return matrix.astype(np.float32)


RESIZE = resize_matrix()


def fold_taps(resize: np.ndarray = RESIZE) -> tuple[np.ndarray, int]:
    """[KERNEL, taps] interpolation weights that every interior output position applies to its
    source pixels, and the offset of its first source pixel from the position. Checked to be the
    same at every interior position (what makes the fold a convolution)."""
    def rows(o: int) -> np.ndarray:  # the padded rows that output o's window covers
        return resize[STRIDE * o : STRIDE * o + KERNEL]

    used = [np.flatnonzero(rows(o).any(axis=0)) for o in range(INNER_FIRST, INNER_LAST + 1)]
    offset, taps = int(used[0][0]) - INNER_FIRST, len(used[0])
    fold = rows(INNER_FIRST)[:, INNER_FIRST + offset : INNER_FIRST + offset + taps]
    for o, columns in zip(range(INNER_FIRST, INNER_LAST + 1), used, strict=True):
        if list(columns) != list(range(o + offset, o + offset + taps)) or not np.allclose(
            rows(o)[:, o + offset : o + offset + taps], fold
        ):
            raise AssertionError(f"the resize is not shift-invariant at output {o}")
    if offset + INNER_FIRST != 0 or INNER - 1 + taps != SOURCE_SIZE:
        raise AssertionError("the interior does not span the source exactly")
    return fold, offset


FOLD, FOLD_OFFSET = fold_taps()  # [11, 4], -2: output o reads source pixels o-2 .. o+1


class SourceBatch(NamedTuple):
    """What the fast first layer reads for a batch, all float32 and normalized: the source images
    and the four strips of their padded, resized images that the frame's windows cover."""

    source: np.ndarray  # [N, 3, 32, 32]
    top: np.ndarray  # [N, 3, 15, 138]: padded rows for output rows 0 and 1
    bottom: np.ndarray  # [N, 3, 11, 138]: for output row 31
    left: np.ndarray  # [N, 3, 123, 15]: for output columns 0 and 1 of rows 2..30
    right: np.ndarray  # [N, 3, 123, 11]: for output column 31 of rows 2..30


def padded_span(first: int, last: int) -> slice:
    """The padded rows (or columns) that the windows of outputs first..last cover."""
    return slice(STRIDE * first, STRIDE * last + KERNEL)


TOP, BOTTOM = padded_span(0, INNER_FIRST - 1), padded_span(INNER_LAST + 1, OUT_SIZE - 1)
MIDDLE = padded_span(INNER_FIRST, INNER_LAST)


def source_batch(source: np.ndarray) -> SourceBatch:
    """The batch for first_convolution, from normalized source images [N, 3, 32, 32] (the resize
    is linear and keeps constants, so normalizing before it is normalizing after it)."""
    if source.shape[1:] != (3, SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"source images must be [N, 3, {SOURCE_SIZE}, {SOURCE_SIZE}], got {list(source.shape)}")
    source = np.ascontiguousarray(source, dtype=np.float32)

    def strip(rows: slice, columns: slice) -> np.ndarray:
        return np.ascontiguousarray(RESIZE[rows] @ source @ RESIZE[columns].T)

    everything = slice(None)
    return SourceBatch(source, strip(TOP, everything), strip(BOTTOM, everything),
                       strip(MIDDLE, padded_span(0, INNER_FIRST - 1)), strip(MIDDLE, padded_span(INNER_LAST + 1, OUT_SIZE - 1)))


def first_convolution(conv, batch):
    """conv (the stem's 11x11 stride-4 Conv2D) of the resized images, from a SourceBatch of Paddle
    tensors: the folded 4x4 convolution inside, the convolution itself on the frame."""
    import paddle
    import paddle.nn.functional as F

    if (list(conv._kernel_size), list(conv._stride), conv._padding, conv._groups) != ([KERNEL] * 2, [STRIDE] * 2,
                                                                                       PADDING, 1):
        raise ValueError("first_convolution needs an 11x11 convolution of stride 4, padding 5, one group")
    fold = paddle.to_tensor(FOLD)
    folded = paddle.einsum("ocyx,ya,xb->ocab", conv.weight, fold, fold)
    inner = F.conv2d(batch.source, folded)  # [N, out, 29, 29]
    top, bottom, left, right = (F.conv2d(s, conv.weight, stride=STRIDE) for s in batch[1:])
    out = paddle.concat([top, paddle.concat([left, inner, right], axis=3), bottom], axis=2)
    n, c = out.shape[:2]
    # the bias over a [N, C, H*W] view, as model/alexnet.py's Conv2D adds it
    return (out.reshape([n, c, OUT_SIZE * OUT_SIZE]) + conv.bias.reshape([c, 1])).reshape([n, c, OUT_SIZE, OUT_SIZE])


def to_tensors(batch: SourceBatch) -> SourceBatch:
    import paddle

    return SourceBatch(*(paddle.to_tensor(part) for part in batch))


def forward_from_source(model, batch: SourceBatch):
    """The logits of model/alexnet.py's AlexNet_ACmix or AlexNet (eager) for the resized images of
    a SourceBatch (numpy or Paddle): its first convolution by first_convolution, the rest as it is."""
    import paddle

    if isinstance(batch.source, np.ndarray):
        batch = to_tensors(batch)
    features = model.features
    x = first_convolution(features[0], batch)
    return model.classifier(paddle.flatten(features[1:](x), 1))

"""Training's fast first layer: AlexNet's first convolution (11x11, stride 4, padding 5) of a 32x32
image resized to 128x128, computed with the resize folded in along the rows.

The resize to 128 (bilinear, as model/preprocessing.py does it) is linear, separable, and four
times the source size. Down the rows, away from the top and bottom, every output row of the
stride-4 convolution sees the same 4 source rows through the same mix of weights; there the
convolution folds with the vertical resize into a 4x11 convolution (stride 1 down, 4 across) of
the image resized across only (its weights: the 11x11 kernel through the resize's interpolation
weights, `FOLD`), 4/11 of the products. In output rows 0, 1 and 31 the convolution's zero padding
cuts the window, so it runs as it is there, over strips of the resized image. Forward and
backward equal the convolution of the resized image to float rounding; the layer is ~2x faster
forward and backward than the convolution at 128x128, which Paddle runs as im2col and a GEMM.
(Folding both axes and assembling the frame's columns apart was slower: Paddle's concatenation
along the last axis copies a few floats at a time.)

The resized image is the exact bilinear interpolation (float): Pillow's uint8 resize, which
inference runs, rounds it to a grey level after each of its two passes (at most 1 / 255 apart).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from model.preprocessing import IMAGE_SIZE

SOURCE_SIZE = 32
KERNEL, STRIDE, PADDING = 11, 4, 5  # the first convolution of model/alexnet.py's stem
OUT_SIZE = (IMAGE_SIZE + 2 * PADDING - KERNEL) // STRIDE + 1  # 32
# Output rows (or columns) whose window lies inside the image: the interior, [2, 30].
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


FOLD, FOLD_OFFSET = fold_taps()  # [11, 4], -2: output row o reads source rows o-2 .. o+1


class SourceBatch(NamedTuple):
    """What the fast first layer reads for a batch, all float32 and normalized: the images resized
    across only (zero-padded across as the convolution pads), and the two strips of the padded,
    resized images that the windows of the top and bottom output rows cover."""

    across: np.ndarray  # [N, 3, 32, 138]
    top: np.ndarray  # [N, 3, 15, 138]: padded rows for output rows 0 and 1
    bottom: np.ndarray  # [N, 3, 11, 138]: for output row 31


def padded_span(first: int, last: int) -> slice:
    """The padded rows that the windows of output rows first..last cover."""
    return slice(STRIDE * first, STRIDE * last + KERNEL)


TOP, BOTTOM = padded_span(0, INNER_FIRST - 1), padded_span(INNER_LAST + 1, OUT_SIZE - 1)


def source_batch(source: np.ndarray) -> SourceBatch:
    """The batch for first_convolution, from normalized source images [N, 3, 32, 32] (the resize
    is linear and keeps constants, so normalizing before it is normalizing after it)."""
    if source.shape[1:] != (3, SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"source images must be [N, 3, {SOURCE_SIZE}, {SOURCE_SIZE}], got {list(source.shape)}")
    across = np.ascontiguousarray(np.asarray(source, np.float32) @ RESIZE.T)
    return SourceBatch(across, np.ascontiguousarray(RESIZE[TOP] @ across), np.ascontiguousarray(RESIZE[BOTTOM] @ across))


def first_convolution(conv, batch):
    """conv (the stem's 11x11 stride-4 Conv2D) of the resized images, from a SourceBatch of Paddle
    tensors: folded down the rows inside, the convolution itself in the top and bottom rows."""
    import paddle
    import paddle.nn.functional as F

    if (list(conv._kernel_size), list(conv._stride), conv._padding, conv._groups) != ([KERNEL] * 2, [STRIDE] * 2,
                                                                                       PADDING, 1):
        raise ValueError("first_convolution needs an 11x11 convolution of stride 4, padding 5, one group")
    folded = paddle.einsum("ocyx,ya->ocax", conv.weight, paddle.to_tensor(FOLD))  # [out, in, 4, 11]
    middle = F.conv2d(batch.across, folded, stride=(1, STRIDE))  # output rows 2..30
    top, bottom = (F.conv2d(strip, conv.weight, stride=STRIDE) for strip in (batch.top, batch.bottom))
    out = paddle.concat([top, middle, bottom], axis=2)
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

    if isinstance(batch.across, np.ndarray):
        batch = to_tensors(batch)
    features = model.features
    x = first_convolution(features[0], batch)
    return model.classifier(paddle.flatten(features[1:](x), 1))

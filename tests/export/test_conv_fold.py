"""export/conv_fold.py: ACmix's convolution path folded into one dense convolution (the int8 source)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from export.conv_fold import bias_map, fold_grouped_convolutions, fold_weights


def grouped_convolutions(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute))


def test_the_folded_network_gives_the_same_logits_with_dense_convolutions_only(onnx_model, tmp_path):
    from tests.conftest import images, run_onnx

    model = onnx.load(str(onnx_model))
    before = Counter(n.op_type for n in model.graph.node)
    assert grouped_convolutions(model) == 9  # three per ACmix layer, one per projection
    assert fold_grouped_convolutions(model) == 3
    onnx.checker.check_model(model, full_check=True)
    after = Counter(n.op_type for n in model.graph.node)
    assert grouped_convolutions(model) == 0
    assert after["Conv"] == before["Conv"] - 6  # one dense convolution per layer for three grouped ones
    folded = tmp_path / "folded.onnx"
    onnx.save(model, str(folded))
    batch = images(8, seed=3)
    expected = run_onnx(onnx_model, batch)
    np.testing.assert_allclose(run_onnx(folded, batch), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def reference_grouped_conv(x: np.ndarray, weight: np.ndarray, groups: int) -> np.ndarray:
    """A direct, loop-by-loop grouped same-size convolution with zero padding, x [C, H, W]."""
    out, in_g, k = weight.shape[0], weight.shape[1], weight.shape[2]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[1:]
    result = np.zeros((out, height, width))
    for o in range(out):
        channels = padded[(o // (out // groups)) * in_g : (o // (out // groups) + 1) * in_g]
        for y in range(height):
            for z in range(width):
                result[o, y, z] = (channels[:, y : y + k, z : z + k] * weight[o]).sum()
    return result


def test_the_fold_is_the_grouped_convolution_of_the_projection_border_included():
    rng = np.random.default_rng(0)
    groups, in_g, out, in_x, size = 3, 4, 6, 5, 5
    grouped = rng.standard_normal((out, in_g, 3, 3))
    projection = rng.standard_normal((groups * in_g, in_x, 1, 1))
    projection_bias = rng.standard_normal(groups * in_g)
    x = rng.standard_normal((in_x, size, size))
    projected = np.einsum("cx,xhw->chw", projection[:, :, 0, 0], x) + projection_bias[:, None, None]
    expected = reference_grouped_conv(projected, grouped, groups)
    dense = fold_weights(grouped, groups, projection)
    got = reference_grouped_conv(x, dense, 1) + bias_map(grouped, groups, projection_bias, size, size)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    # The biases' map differs at the border: the zero padding reads no bias there.
    border = bias_map(grouped, groups, projection_bias, size, size)
    assert not np.allclose(border[:, 0, 0], border[:, 2, 2])

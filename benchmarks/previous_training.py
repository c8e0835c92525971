"""The training path as it was before the training-speed work (commit 00c4a55), kept as the baseline
that `python -m benchmarks.paddle_acmix` measures the current one against, in the same run.

Same parameters as model/alexnet.py (the weights are shared); only the eager forward differs:
q, k, v sliced out of the projection, `k - pe` and the stem's biases broadcast over 4-D tensors,
dep_conv's col2im by F.fold. Its batches come from the reference augmentation at 128x128, and its
process took MKL's AVX2 code path on every AMD CPU (`previous_environment`).
"""

from __future__ import annotations

import os

import paddle
import paddle.nn.functional as F
from paddle import nn

from model.alexnet import ACmix, AlexNet_ACmix, Conv2D


class PreviousACmix(ACmix):
    def forward(self, x):
        size, length, head_dim = self.feature_size, self.feature_size**2, self.head_dim
        qkv = self._project(x)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        conv = self._convolution(qkv)
        pe = self.conv_p(self.grid).reshape([1, 1, head_dim, length])
        q_scaled = q * (float(head_dim) ** -0.5)
        logits = paddle.matmul(q_scaled, k - pe, transpose_x=True) + self.window_bias
        attn = F.softmax(logits, axis=-1)
        out_att = paddle.matmul(v, attn, transpose_y=True).reshape([0, self.out_planes, size, size])
        return self.rate1 * out_att + conv

    def _convolution(self, qkv):
        k, groups, size = self.kernel_conv, self.head_dim, self.feature_size
        length = size * size
        mix = self.fc.weight.reshape([k * k, 3 * self.head])
        flat = qkv.reshape([0, 3 * self.head, groups * length])
        weight, bias = self.dep_conv.weight * self.rate2, self.dep_conv.bias * self.rate2
        per_group = self.out_planes // groups
        f = paddle.matmul(flat, mix, transpose_x=True, transpose_y=True).reshape([0, groups, length, k * k])
        w = weight.reshape([groups, per_group, k * k, k * k]).flip([3]).transpose([0, 1, 3, 2])
        z = paddle.matmul(w.reshape([1, groups, per_group * k * k, k * k]), f, transpose_y=True)
        out = F.fold(z.reshape([0, -1, length]), [size, size], k, paddings=k // 2)
        return out + bias.reshape([1, -1, 1, 1])


def previous_model() -> AlexNet_ACmix:
    """AlexNet-ACmix with the previous eager forward: plain nn.Conv2D stem, PreviousACmix layers."""
    model = AlexNet_ACmix()
    for i, layer in enumerate(model.features):
        if isinstance(layer, Conv2D):
            plain = nn.Conv2D(layer._in_channels, layer._out_channels, layer._kernel_size, layer._stride,
                              layer._padding)
            model.features[i] = plain
        elif isinstance(layer, ACmix):
            model.features[i] = PreviousACmix(layer.in_planes, layer.out_planes, kernel_conv=layer.kernel_conv)
    return model


def previous_environment(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The process environment the previous path ran with: MKL_DEBUG_CPU_TYPE=5 (AVX2) on AMD, as
    model/runtime.py set it then, whatever the CPU's AVX-512 (a value the user set is kept)."""
    from model.runtime import MKL_AVX2, cpu_vendor_and_flags

    env = dict(os.environ)
    vendor, _ = cpu_vendor_and_flags(cpuinfo_path)
    if vendor == "AuthenticAMD":
        env.setdefault("MKL_DEBUG_CPU_TYPE", MKL_AVX2)
    return env

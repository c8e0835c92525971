"""AlexNet and AlexNet-ACmix for CIFAR-10 at 128x128.

ACmix (Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022) shares
three 1x1 projections between a local self-attention path and a convolution path, and mixes
the two outputs with learnable scalars. Parameter names and shapes follow the reference
notebook (see ../shared/reference), so its `.pdparams` load with `set_state_dict` unchanged.

The attention path is computed in the masked-global form of ../shared/notes/acmix-attention.md:
on a HxW map, a KxK window with reflect padding reaches only map positions, so

    softmax_j(q_p . (k_m(j) + pe_p - pe_m(j)))  summed over window offsets j
  = softmax_m(q_p . (k - pe)_m + log count[p, m])  summed over map positions m

where count[p, m] is how many offsets of p's window land on m (reflection duplicates some).
q_p . pe_p is constant along the softmax axis and drops out. That is two batched matmuls per
head with a constant additive mask, built once per layer.

The projections and the convolution path are laid out differently in eager Paddle (training) and
when traced for export (ONNX Runtime, TensorRT), each the faster form for its runtime; the tests
check both against the reference transcription.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from model.spec import NUM_CLASSES

# A large negative instead of -inf keeps the mask finite in fp16 engines.
MASKED_LOGIT = -1e4
# The classifier's dropout probability in training: the reference's.
DROPOUT = 0.5

# Head dimensions per group of the exported convolution path: with 4 heads, 4 of them make groups
# of 16 input and 16 output channels, the blocks (8 on AVX2) in which ONNX Runtime runs direct
# convolutions. Smaller groups fall back to an im2col per image and group: measured 1.5x slower
# per layer at batch 128, although they compute a fifth of the products.
EXPORT_GROUP_DIMS = 4


def reflect_index(i: int, size: int) -> int:
    """Index into a map of `size` that reflect padding maps `i` to (no edge repeat)."""
    if i < 0:
        return -i
    if i >= size:
        return 2 * (size - 1) - i
    return i


def window_log_counts(height: int, width: int, kernel: int) -> np.ndarray:
    """[L, L] with log(number of window offsets of query p that land on m), MASKED_LOGIT where none."""
    pad = (kernel - 1) // 2
    if pad >= min(height, width):
        raise ValueError(f"reflect padding {pad} needs a map larger than {height}x{width}")
    length = height * width
    counts = np.zeros((length, length), dtype=np.float64)
    for py in range(height):
        for px in range(width):
            for dy in range(-pad, pad + 1):
                for dx in range(-pad, pad + 1):
                    my = reflect_index(py + dy, height)
                    mx = reflect_index(px + dx, width)
                    counts[py * width + px, my * width + mx] += 1
    with np.errstate(divide="ignore"):
        logs = np.log(counts)
    return np.where(counts > 0, logs, MASKED_LOGIT).astype(np.float32)


def position_grid(height: int, width: int) -> np.ndarray:
    """[1, 2, H, W]: channel 0 the x coordinate, channel 1 the y coordinate, each in [-1, 1]."""
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
    grid = np.stack([np.tile(xs[None, :], (height, 1)), np.tile(ys[:, None], (1, width))])
    return grid[None]


def group_membership(out_planes: int, per_group: int, group_dims: int) -> np.ndarray:
    """[out, 1, group_dims, 1]: 1 where output channel o belongs to head dimension i of its merged group."""
    member = np.zeros((out_planes, 1, group_dims, 1), dtype=np.float32)
    for o in range(out_planes):
        member[o, 0, (o // per_group) % group_dims, 0] = 1.0
    return member


def fold_matrix(height: int, width: int, kernel: int) -> np.ndarray:
    """[k*k*L, L]: F.fold (col2im, padding (k-1)/2) of k*k maps of L positions as a matrix product:
    row (j, l) is 1 at the position that kernel offset j moves l to, where that is on the map."""
    pad, length = (kernel - 1) // 2, height * width
    matrix = np.zeros((kernel * kernel, length, length), dtype=np.float32)
    for j in range(kernel * kernel):
        dy, dx = j // kernel - pad, j % kernel - pad
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    matrix[j, y * width + x, (y + dy) * width + x + dx] = 1.0
    return matrix.reshape(kernel * kernel * length, length)


def shift_kernels(out_planes: int, kernel: int) -> np.ndarray:
    """[out, k*k, k, k]: input channel i of each group is shifted by kernel offset i."""
    eye = np.zeros((kernel * kernel, kernel, kernel), dtype=np.float32)
    for i in range(kernel * kernel):
        eye[i, i // kernel, i % kernel] = 1.0
    return np.repeat(eye[None], out_planes, axis=0)


class ACmix(nn.Layer):
    """Self-attention and convolution over shared q/k/v projections, for a fixed map size.

    feature_size is the HxW of the input map: the attention mask and positional grid are
    constants of it. AlexNet-ACmix runs every ACmix layer on 7x7 maps.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_att: int = 7,
        head: int = 4,
        kernel_conv: int = 3,
        stride: int = 1,
        dilation: int = 1,
        feature_size: int = 7,
    ):
        super().__init__()
        if stride != 1 or dilation != 1:
            raise NotImplementedError("ACmix here supports stride 1 and dilation 1 (all AlexNet-ACmix uses)")
        if out_planes % head:
            raise ValueError(f"out_planes {out_planes} is not divisible by head {head}")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.head = head
        self.head_dim = out_planes // head
        self.kernel_conv = kernel_conv
        self.feature_size = feature_size

        self.rate1 = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.5))
        self.rate2 = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.5))
        self.conv1 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2D(2, self.head_dim, kernel_size=1)
        self.fc = nn.Conv2D(3 * head, kernel_conv * kernel_conv, kernel_size=1, bias_attr=False)
        self.dep_conv = nn.Conv2D(
            kernel_conv * kernel_conv * self.head_dim,
            out_planes,
            kernel_size=kernel_conv,
            groups=self.head_dim,
            padding=kernel_conv // 2,
        )
        # The reference replaces dep_conv's parameters: a fixed shift kernel and one bias scalar
        # shared by every output channel. Same shapes here, so its checkpoints load.
        self.dep_conv.weight = self.create_parameter(
            [out_planes, kernel_conv * kernel_conv, kernel_conv, kernel_conv],
            default_initializer=nn.initializer.Assign(shift_kernels(out_planes, kernel_conv)),
        )
        self.dep_conv.bias = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.0))

        size = feature_size
        self.register_buffer("grid", paddle.to_tensor(position_grid(size, size)), persistable=False)
        self.register_buffer(
            "window_bias", paddle.to_tensor(window_log_counts(size, size, kernel_att)), persistable=False
        )
        self.register_buffer("fold_matrix", paddle.to_tensor(fold_matrix(size, size, kernel_conv)), persistable=False)
        group_dims = EXPORT_GROUP_DIMS if self.head_dim % EXPORT_GROUP_DIMS == 0 else 1
        membership = group_membership(out_planes, out_planes // self.head_dim, group_dims)
        self.register_buffer("export_membership", paddle.to_tensor(membership), persistable=False)

    def forward(self, x):
        # 0 in a reshape copies the batch dimension, which stays dynamic in exported graphs.
        size, length = self.feature_size, self.feature_size**2
        head_dim = self.head_dim
        pe = self.conv_p(self.grid).reshape([head_dim, length])
        if paddle.in_dynamic_mode():
            qkv = self._project(x)
            # unbind, not qkv[:, i]: Paddle's slice gradient writes a zero tensor of the whole input
            # per slice (8x slower here).
            q, k, v = paddle.unbind(qkv, axis=1)
            conv = self._convolution(qkv)
            # k - pe broadcast over rows of a 2-D view: Paddle's CPU broadcast is ~7x faster so than
            # over [1, 1, head_dim, L].
            k_pe = (k.reshape([-1, head_dim * length]) - pe.reshape([-1])).reshape([-1, self.head, head_dim, length])
        else:
            (q, k, v), conv = self._project_and_convolve_for_export(x)
            k_pe = k - pe

        # Stage II, attention: softmax(q^T (k - pe) + log count) per head.
        q_scaled = q * (float(head_dim) ** -0.5)
        logits = paddle.matmul(q_scaled, k_pe, transpose_x=True) + self.window_bias
        attn = F.softmax(logits, axis=-1)
        out_att = paddle.matmul(v, attn, transpose_y=True).reshape([0, self.out_planes, size, size])
        return self.rate1 * out_att + conv

    def _projection(self):
        """The three 1x1 projections as one: weight [3 * out, in, 1, 1] and bias [3 * out]."""
        weight = paddle.concat([self.conv1.weight, self.conv2.weight, self.conv3.weight], axis=0)
        bias = paddle.concat([self.conv1.bias, self.conv2.bias, self.conv3.bias], axis=0)
        return weight, bias

    def _project(self, x):
        """Stage I, eager: [B, 3, head, head_dim, L] by one matmul (Paddle's 1x1 convolution on a
        7x7 map is ~1.5x slower)."""
        weight, bias = self._projection()
        flat = x.reshape([0, self.in_planes, self.feature_size**2])
        qkv = paddle.matmul(weight.reshape([-1, self.in_planes]), flat) + bias.reshape([-1, 1])
        return qkv.reshape([0, 3, self.head, self.head_dim, -1])

    def _convolution(self, qkv):
        """Stage II, convolution, eager: fc mixes the 3*head projections into k*k maps per channel,
        which dep_conv (scaled by rate2 through its small weights rather than its output) shifts
        and sums. fc is laid out [B, head_dim, L, k*k] so that the next matmul reads it transposed
        without a copy; one batched matmul and a col2im then do dep_conv, 2.5x faster forward and
        backward than Paddle's grouped convolution. The col2im is a product with the constant
        fold_matrix, ~1.5x faster than F.fold forward and backward.
        """
        k, groups, size = self.kernel_conv, self.head_dim, self.feature_size
        length = size * size
        mix = self.fc.weight.reshape([k * k, 3 * self.head])
        flat = qkv.reshape([0, 3 * self.head, groups * length])
        weight, bias = self.dep_conv.weight * self.rate2, self.dep_conv.bias * self.rate2
        per_group = self.out_planes // groups
        f = paddle.matmul(flat, mix, transpose_x=True, transpose_y=True).reshape([0, groups, length, k * k])
        # z[o, j] = weight[o, :, flipped j] . f: fold then adds z[o, j] at offset j around each
        # position, which is the convolution's sum over weight[o, :, j] . f at offset -j.
        w = weight.reshape([groups, per_group, k * k, k * k]).flip([3]).transpose([0, 1, 3, 2])
        z = paddle.matmul(w.reshape([1, groups, per_group * k * k, k * k]), f, transpose_y=True)
        out = paddle.matmul(z.reshape([-1, k * k * length]), self.fold_matrix)
        return (out + bias).reshape([-1, self.out_planes, size, size])

    def _project_and_convolve_for_export(self, x):
        """Stage I and stage II's convolution as traced for ONNX: per q, k and v a 1x1 and a grouped
        k x k convolution, summed, and a transpose for the attention.

        fc is linear and has no bias, so it folds into dep_conv: a grouped convolution straight from
        the projections, 3 * head input channels per head dimension. Each projection's output
        channels are ordered so that a group of EXPORT_GROUP_DIMS head dimensions is contiguous
        ([groups, head, group_dims]); the grouped convolution reads it as it is, with zero weights
        between the head dimensions of a group, and the attention's transpose moves contiguous
        runs of group_dims * L values. One projection per q, k and v, rather than one for all
        three, spares the attention a split of the projected tensor (~4% faster in ONNX Runtime).
        Every weight product here depends on parameters only and is folded at export.
        """
        k, head, dims, length = self.kernel_conv, self.head, self.head_dim, self.feature_size**2
        group_dims = self.export_membership.shape[2]
        groups = dims // group_dims
        weight, bias = self._projection()
        weight = weight.reshape([3, head, groups, group_dims, self.in_planes]).transpose([0, 2, 1, 3, 4])
        bias = bias.reshape([3, head, groups, group_dims]).transpose([0, 2, 1, 3])
        # folded[o, c, tap] = sum_j dep_conv[o, j, tap] * fc[j, c], with c = (q/k/v, head); then
        # spread over the group's head dimensions: only the one output channel o belongs to keeps it.
        mix = self.fc.weight.reshape([k * k, 3 * head])
        folded = paddle.matmul(mix, self.dep_conv.weight.reshape([self.out_planes, k * k, k * k]), transpose_x=True)
        member = self.export_membership.unsqueeze(1)
        spread = folded.reshape([self.out_planes, 3, head, 1, k * k]) * member * self.rate2

        terms, qkv = [], []
        for i in range(3):
            projected = F.conv2d(x, weight[i].reshape([-1, self.in_planes, 1, 1]), bias[i].reshape([-1]))
            # dep_conv's one shared bias, once, as the first convolution's per-channel bias (a [1] bias
            # would be traced as a separate Add)
            term_bias = (self.dep_conv.bias * self.rate2).expand([self.out_planes]) if i == 0 else None
            terms.append(F.conv2d(projected, spread[:, i].reshape([self.out_planes, -1, k, k]), term_bias,
                                  padding=k // 2, groups=groups))
            per_head = projected.reshape([0, groups, head, group_dims, length]).transpose([0, 2, 1, 3, 4])
            qkv.append(per_head.reshape([0, head, dims, length]))
        return qkv, terms[0] + terms[1] + terms[2]


class Conv2D(nn.Conv2D):
    """nn.Conv2D (same parameters) whose bias, in eager Paddle, is added over a [N, C, H*W] view:
    Paddle's CPU broadcast over [1, C, 1, 1] takes ~3x longer forward and backward (~100 ms per
    training step for the stem). Traced for export it is the plain convolution with its bias."""

    def forward(self, x):
        if not paddle.in_dynamic_mode():
            return super().forward(x)
        out = F.conv2d(x, self.weight, None, self._stride, self._padding, self._dilation, self._groups)
        n, c, h, w = out.shape
        return (out.reshape([n, c, h * w]) + self.bias.reshape([c, 1])).reshape([n, c, h, w])


def _stem() -> list[nn.Layer]:
    return [
        Conv2D(3, 48, kernel_size=11, stride=4, padding=11 // 2),
        nn.ReLU(),
        nn.MaxPool2D(kernel_size=3, stride=2),
        Conv2D(48, 128, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2D(kernel_size=3, stride=2),
    ]


def _classifier(num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(3 * 3 * 128, 2048),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(2048, num_classes),
    )


class AlexNet_ACmix(nn.Layer):  # the reference's name, kept for its checkpoints
    """AlexNet with its last three convolutions replaced by ACmix layers (7,051,159 parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = DROPOUT):
        super().__init__()
        self.features = nn.Sequential(
            *_stem(),
            ACmix(128, 192, kernel_conv=3),
            nn.ReLU(),
            ACmix(192, 192, kernel_conv=3),
            nn.ReLU(),
            ACmix(192, 128, kernel_conv=3),
            nn.ReLU(),
            nn.MaxPool2D(kernel_size=3, stride=2),
        )
        self.classifier = _classifier(num_classes, dropout)

    def forward(self, x):
        return self.classifier(paddle.flatten(self.features(x), 1))


class AlexNet(nn.Layer):
    """The plain AlexNet baseline of the reference (7,524,042 parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = DROPOUT):
        super().__init__()
        self.features = nn.Sequential(
            *_stem(),
            nn.Conv2D(128, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2D(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2D(192, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2D(kernel_size=3, stride=2),
        )
        self.classifier = _classifier(num_classes, dropout)

    def forward(self, x):
        return self.classifier(paddle.flatten(self.features(x), 1))


ARCHITECTURES = {"alexnet_acmix": AlexNet_ACmix, "alexnet": AlexNet}


def build_model(arch: str = "alexnet_acmix", num_classes: int = NUM_CLASSES, dropout: float = DROPOUT) -> nn.Layer:
    """`dropout`: the classifier's dropout probability in training (no parameters depend on it)."""
    try:
        return ARCHITECTURES[arch](num_classes=num_classes, dropout=dropout)
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}") from None

"""A straight transcription of the reference notebook's ACmix and networks: the test oracle.

Slow on purpose (unfold of 7x7 windows, broadcasts, the positional grid rebuilt per call);
tests compare model/alexnet.py against it. Only formatting differs from the notebook.
"""

import paddle
from paddle import nn


def position(H, W):
    loc_w = paddle.repeat_interleave(paddle.linspace(-1.0, 1.0, W).unsqueeze(0), repeats=H, axis=0)
    loc_h = paddle.repeat_interleave(paddle.linspace(-1.0, 1.0, H).unsqueeze(1), repeats=W, axis=1)
    loc = paddle.concat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], axis=0).unsqueeze(0)
    return loc


def stride(x, stride):
    return x[:, :, ::stride, ::stride]


class ACmix(nn.Layer):
    def __init__(self, in_planes, out_planes, kernel_att=7, head=4, kernel_conv=3, stride=1, dilation=1):
        super().__init__()
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.head = head
        self.kernel_att = kernel_att
        self.kernel_conv = kernel_conv
        self.stride = stride
        self.dilation = dilation
        self.rate1 = self.create_parameter([1], default_initializer=nn.initializer.Assign([0.5]))
        self.rate2 = self.create_parameter([1], default_initializer=nn.initializer.Assign([0.5]))
        self.head_dim = self.out_planes // self.head

        self.conv1 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2D(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2D(2, self.head_dim, kernel_size=1)

        self.padding_att = (self.dilation * (self.kernel_att - 1) + 1) // 2
        self.pad_att = nn.Pad2D(self.padding_att, mode="reflect")
        self.unfold = nn.Unfold(kernel_sizes=kernel_att, strides=self.stride, paddings=0)
        self.softmax = nn.Softmax(axis=1)

        self.fc = nn.Conv2D(3 * self.head, self.kernel_conv * self.kernel_conv, kernel_size=1, bias_attr=False)
        self.dep_conv = nn.Conv2D(
            self.kernel_conv * self.kernel_conv * self.head_dim, out_planes,
            kernel_size=self.kernel_conv, bias_attr=True, groups=self.head_dim, padding=1, stride=stride)
        self.reset_parameters()

    def reset_parameters(self):
        kernel = paddle.zeros((self.kernel_conv * self.kernel_conv, self.kernel_conv, self.kernel_conv))
        for i in range(self.kernel_conv * self.kernel_conv):
            kernel[i, i // self.kernel_conv, i % self.kernel_conv] = 1.0
        kernel = paddle.repeat_interleave(kernel.unsqueeze(0), self.out_planes, axis=0)
        self.dep_conv.weight = self.create_parameter(
            (self.out_planes, 1, 1, 1), default_initializer=nn.initializer.Assign(kernel))
        self.dep_conv.bias = self.create_parameter([1], default_initializer=nn.initializer.Assign([0.0]))

    def forward(self, x):
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)
        scaling = float(self.head_dim) ** -0.5
        b, c, h, w = q.shape
        h_out, w_out = h // self.stride, w // self.stride

        pe = self.conv_p(position(h, w))

        q_att = q.reshape((b * self.head, self.head_dim, h, w)) * scaling
        k_att = k.reshape((b * self.head, self.head_dim, h, w))
        v_att = v.reshape((b * self.head, self.head_dim, h, w))

        if self.stride > 1:
            q_att = stride(q_att, self.stride)
            q_pe = stride(pe, self.stride)
        else:
            q_pe = pe

        unfold_k = self.unfold(self.pad_att(k_att)).reshape(
            (b * self.head, self.head_dim, self.kernel_att * self.kernel_att, h_out, w_out))
        unfold_rpe = self.unfold(self.pad_att(pe)).reshape(
            (1, self.head_dim, self.kernel_att * self.kernel_att, h_out, w_out))

        att = (q_att.unsqueeze(2) * (unfold_k + q_pe.unsqueeze(2) - unfold_rpe)).sum(1)
        att = self.softmax(att)

        out_att = self.unfold(self.pad_att(v_att)).reshape(
            (b * self.head, self.head_dim, self.kernel_att * self.kernel_att, h_out, w_out))
        out_att = (att.unsqueeze(1) * out_att).sum(2).reshape((b, self.out_planes, h_out, w_out))

        f_all = self.fc(paddle.concat([
            q.reshape((b, self.head, self.head_dim, h * w)),
            k.reshape((b, self.head, self.head_dim, h * w)),
            v.reshape((b, self.head, self.head_dim, h * w))], axis=1))
        f_conv = f_all.transpose([0, 2, 1, 3]).reshape((x.shape[0], -1, x.shape[-2], x.shape[-1]))
        out_conv = self.dep_conv(f_conv)

        return self.rate1 * out_att + self.rate2 * out_conv


class AlexNet_ACmix(nn.Layer):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(3, 48, kernel_size=11, stride=4, padding=11 // 2),
            nn.ReLU(),
            nn.MaxPool2D(kernel_size=3, stride=2),
            nn.Conv2D(48, 128, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2D(kernel_size=3, stride=2),
            ACmix(128, 192, kernel_conv=3, stride=1),
            nn.ReLU(),
            ACmix(192, 192, kernel_conv=3, stride=1),
            nn.ReLU(),
            ACmix(192, 128, kernel_conv=3, stride=1),
            nn.ReLU(),
            nn.MaxPool2D(kernel_size=3, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(3 * 3 * 128, 2048),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = paddle.flatten(x, 1)
        return self.classifier(x)

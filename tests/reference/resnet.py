"""Float64 NumPy twin of the hybrid ViT's ResNet stem (google-research/vision_transformer
models_resnet.py), keyed by the released flat .npz names."""

import numpy as np


def tf_same_pads(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2  # the odd pixel goes at the bottom / right


def np_std_conv(x, w, stride):
    w = w - w.mean(axis=(0, 1, 2))
    w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
    kh, kw = w.shape[:2]
    ph, pw = tf_same_pads(x.shape[1], kh, stride), tf_same_pads(x.shape[2], kw, stride)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh, ow = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    y = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for a in range(kh):
        for b in range(kw):
            patch = xp[
                :, a : a + stride * (oh - 1) + 1 : stride, b : b + stride * (ow - 1) + 1 : stride
            ]
            y += patch @ w[a, b]
    return y


def np_group_norm(x, scale, bias, groups=32, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(x.shape) * scale.reshape(-1) + bias.reshape(-1)


def np_max_pool(x):
    ph, pw = tf_same_pads(x.shape[1], 3, 2), tf_same_pads(x.shape[2], 3, 2)
    xp = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-np.inf)
    oh, ow = -(-x.shape[1] // 2), -(-x.shape[2] // 2)
    y = np.full((x.shape[0], oh, ow, x.shape[3]), -np.inf)
    for a in range(3):
        for b in range(3):
            y = np.maximum(y, xp[:, a : a + 2 * (oh - 1) + 1 : 2, b : b + 2 * (ow - 1) + 1 : 2])
    return y


def np_stem(arrays, x, num_layers):
    relu = lambda v: np.maximum(v, 0.0)
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}

    def gn(v, name):
        return np_group_norm(v, a[f"{name}/scale"], a[f"{name}/bias"])

    x = relu(gn(np_std_conv(x, a["conv_root/kernel"], 2), "gn_root"))
    x = np_max_pool(x)
    for i, units in enumerate(num_layers, 1):
        for j in range(1, units + 1):
            u = f"block{i}/unit{j}/"
            stride = 2 if (i > 1 and j == 1) else 1
            residual = x
            if u + "conv_proj/kernel" in a:
                residual = gn(np_std_conv(x, a[u + "conv_proj/kernel"], stride), u + "gn_proj")
            y = relu(gn(np_std_conv(x, a[u + "conv1/kernel"], 1), u + "gn1"))
            y = relu(gn(np_std_conv(y, a[u + "conv2/kernel"], stride), u + "gn2"))
            y = gn(np_std_conv(y, a[u + "conv3/kernel"], 1), u + "gn3")
            x = relu(residual + y)
    return x

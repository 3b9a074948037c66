"""Float64 NumPy ViT forward pass read directly from the published .npz names."""

import numpy as np

from tests.reference import transformer as ref
from tests.reference.resnet import np_stem


def forward_npz(arrays, x):
    """Logits of the reference ViT (vit_jax models_vit.py) for NHWC images ``x``.

    Published layout: per-head attention kernels ``[D, heads, d]``, ``MlpBlock_3``, the
    position embedding under ``Transformer/posembed_input`` (class-token slot included), a
    hybrid ResNet stem when ``conv_root`` is present (``block<i>/unit<j>`` stages).
    """
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x = np.asarray(x, np.float64)
    if "conv_root/kernel" in a:
        stages = sorted({int(k.split("/")[0][5:]) for k in a if k.startswith("block")})
        layers = [len({k.split("/")[1] for k in a if k.startswith(f"block{i}/")}) for i in stages]
        x = np_stem(arrays, x, layers)
    kh, kw, c, d = a["embedding/kernel"].shape
    b, h, w, _ = x.shape
    patches = x.reshape(b, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5)
    t = patches.reshape(b, -1, kh * kw * c) @ a["embedding/kernel"].reshape(-1, d)
    t = t + a["embedding/bias"]
    if "cls" in a:
        t = np.concatenate([np.broadcast_to(a["cls"], (b, 1, d)), t], axis=1)
    t = t + a["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        p = f"Transformer/encoderblock_{i}/"
        y = ref.layer_norm(t, a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"])
        m = p + "MultiHeadDotProductAttention_1/"
        q, k, v = (
            np.einsum("btd,dhe->bthe", y, a[m + f"{n}/kernel"]) + a[m + f"{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
        att = np.einsum("bhqk,bkhe->bqhe", ref.softmax(logits), v)
        t = t + np.einsum("bqhe,hed->bqd", att, a[m + "out/kernel"]) + a[m + "out/bias"]
        y = ref.layer_norm(t, a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"])
        y = ref.gelu_tanh(y @ a[p + "MlpBlock_3/Dense_0/kernel"] + a[p + "MlpBlock_3/Dense_0/bias"])
        t = t + y @ a[p + "MlpBlock_3/Dense_1/kernel"] + a[p + "MlpBlock_3/Dense_1/bias"]
        i += 1
    t = ref.layer_norm(t, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    t = t[:, 0] if "cls" in a else t.mean(axis=1)
    if "pre_logits/kernel" in a:
        t = np.tanh(t @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return t @ a["head/kernel"] + a["head/bias"]

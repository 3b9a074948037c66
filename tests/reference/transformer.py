"""Independent float64 NumPy implementations of the transformer pieces, for the tests."""

import numpy as np


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def attention(x, p, num_heads, mask=None, causal=False):
    b, n, d = x.shape
    hd = d // num_heads
    q = dense(x, p["query"]).reshape(b, n, num_heads, hd)
    k = dense(x, p["key"]).reshape(b, n, num_heads, hd)
    v = dense(x, p["value"]).reshape(b, n, num_heads, hd)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    if causal:
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = softmax(logits)
    y = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
    return dense(y, p["out"])


def encoder_block(x, p, num_heads, mask=None, causal=False):
    y = layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
    x = x + attention(y, p["attn"], num_heads, mask, causal)
    y = layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"])
    return x + dense(gelu_tanh(dense(y, p["mlp"]["fc1"])), p["mlp"]["fc2"])


def to_numpy64(tree):
    if isinstance(tree, dict):
        return {k: to_numpy64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)

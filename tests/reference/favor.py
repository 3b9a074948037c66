"""Independent float64 NumPy twins of FAVOR+: features, bidirectional, causal, exact."""

import numpy as np


def np_softmax_features(x, w, is_query, eps=1e-6, mask=None):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    d = x.shape[-1]
    xs = x / d**0.25
    logits = np.einsum("blhd,md->blhm", xs, w)
    half = 0.5 * np.sum(xs**2, axis=-1, keepdims=True)
    if is_query:
        offset = logits.max(axis=-1, keepdims=True)
    else:
        per_token = logits.max(axis=-1)  # [B, L, H]
        if mask is not None:
            per_token = np.where(mask[:, :, None], per_token, -np.inf)
        offset = per_token.max(axis=1)[:, None, :, None]
    feats = (np.exp(logits - half - offset) + eps) / np.sqrt(w.shape[0])
    if mask is not None and not is_query:
        feats = feats * mask[:, :, None, None]
    return feats


def np_relu_features(x, w=None, eps=1e-3, fn=lambda z: np.maximum(z, 0.0), mask=None):
    x = np.asarray(x, np.float64)
    z = x if w is None else np.einsum("blhd,md->blhm", x, np.asarray(w, np.float64))
    feats = fn(z) + eps
    if mask is not None:
        feats = feats * mask[:, :, None, None]
    return feats


def np_finish(num, den, s, renormalize):
    if not renormalize:
        return num
    den = den + 2 * s * (np.abs(den) <= s)
    return num / den[..., None]


def np_bidirectional(q, k, v, w, kernel="softmax", s=1e-6, mask=None, renormalize=True):
    if kernel == "softmax":
        qf, kf = np_softmax_features(q, w, True, s), np_softmax_features(k, w, False, s, mask)
    else:
        qf, kf = np_relu_features(q, w), np_relu_features(k, w, mask=mask)
    v = np.asarray(v, np.float64)
    num = np.einsum("bihm,bjhm,bjhd->bihd", qf, kf, v)
    den = np.einsum("bihm,bjhm->bih", qf, kf)
    return np_finish(num, den, s, renormalize)


def np_causal_reference_style(q, k, v, w, s=1e-6):
    """The reference's causal formula: key stabiliser = max over ALL positions (leaks)."""
    qf, kf = np_softmax_features(q, w, True, s), np_softmax_features(k, w, False, s)
    scores = np.einsum("bihm,bjhm->bhij", qf, kf) * np.tril(np.ones((q.shape[1],) * 2))
    num = np.einsum("bhij,bjhd->bihd", scores, np.asarray(v, np.float64))
    den = np.einsum("bhij->bih", scores)
    return np_finish(num, den, s, True)


def np_causal_running_max(q, k, v, w, s=1e-6, mask=None, renormalize=True):
    """flaxlab's causal definition, written per query with explicit loops."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    b_, l_, h_, d_ = q.shape
    mask = np.ones((b_, l_), bool) if mask is None else np.asarray(mask)
    qf = np_softmax_features(q, w, True, s)
    ks = k / d_**0.25
    logits = np.einsum("blhd,md->blhm", ks, w)
    half = 0.5 * np.sum(ks**2, axis=-1)
    out = np.zeros(v.shape)
    for b in range(b_):
        for h in range(h_):
            for i in range(l_):
                valid = [j for j in range(i + 1) if mask[b, j]]
                if not valid:
                    continue
                c_i = max(logits[b, j, h].max() for j in valid)
                num, den = np.zeros(v.shape[-1]), 0.0
                for j in valid:
                    kf = (np.exp(logits[b, j, h] - half[b, j, h] - c_i) + s) / np.sqrt(w.shape[0])
                    a = qf[b, i, h] @ kf
                    num += a * v[b, j, h]
                    den += a
                out[b, i, h] = np_finish(num, np.array(den), s, renormalize)
    return out


def np_causal_relu(q, k, v, w=None, mask=None, s=1e-6):
    qf, kf = np_relu_features(q, w), np_relu_features(k, w, mask=mask)
    scores = np.einsum("bihm,bjhm->bhij", qf, kf) * np.tril(np.ones((q.shape[1],) * 2))
    num = np.einsum("bhij,bjhd->bihd", scores, np.asarray(v, np.float64))
    return np_finish(num, np.einsum("bhij->bih", scores), s, True)


def np_exact_attention(q, k, v, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v)

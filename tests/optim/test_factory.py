import numpy as np
import optax
import pytest

from flaxlab.optim import OptimizerConfig, SGDConfig
from flaxlab.optim.factory import kernel_mask, make_optimizer, make_schedule


def expected_lr(step, peak, warmup, total, decay, end_factor):
    if step < warmup:
        return peak * step / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    if decay == "cosine":
        return peak * (end_factor + (1 - end_factor) * 0.5 * (1 + np.cos(np.pi * t)))
    if decay == "linear":
        return peak + (peak * end_factor - peak) * t
    return peak


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(decay):
    cfg = OptimizerConfig(
        learning_rate=0.1, warmup_steps=10, decay=decay, end_learning_rate_factor=0.1
    )
    schedule = make_schedule(cfg, 50)
    for step in (0, 5, 10, 11, 30, 49, 50):
        assert float(schedule(step)) == pytest.approx(
            expected_lr(step, 0.1, 10, 50, decay, 0.1), rel=1e-5, abs=1e-7
        )


def test_weight_decay_only_on_kernels_and_clipping():
    params = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
    assert kernel_mask(params) == {"dense": {"kernel": True, "bias": False}}
    cfg = OptimizerConfig(
        name="sgd",
        learning_rate=1.0,
        sgd=SGDConfig(momentum=0.0),
        weight_decay=0.5,
        decay="constant",
        grad_clip_norm=None,
    )
    tx = make_optimizer(cfg, 10)
    zero = {"dense": {"kernel": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.5)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    clipped = make_optimizer(
        OptimizerConfig(
            name="sgd",
            learning_rate=1.0,
            sgd=SGDConfig(momentum=0.0),
            weight_decay=0.0,
            decay="constant",
            grad_clip_norm=1.0,
        ),
        10,
    )
    big = {"dense": {"kernel": np.full((2, 2), 3.0, np.float32), "bias": np.zeros(2, np.float32)}}
    updates, _ = clipped.update(big, clipped.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def amos_head_update(tmp_path, rules):
    """Amos's first update of a zero head kernel (proportional to its eta) and its slots."""
    from flaxlab.optim import AmosConfig

    path = None
    if rules is not None:
        path = tmp_path / "rules.json"
        path.write_text(rules)
    cfg = OptimizerConfig(
        name="amos",
        decay="constant",
        grad_clip_norm=None,
        amos=AmosConfig(rules=path and str(path)),
    )
    params = {"head": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    grads = {"head": {"kernel": np.ones((4, 3), np.float32), "bias": np.ones(3, np.float32)}}
    tx = make_optimizer(cfg, 100)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return np.asarray(updates["head"]["kernel"]), state


def test_amos_rules_file_overrides_the_default_rules(tmp_path):
    default, _ = amos_head_update(tmp_path, None)
    ruled, state = amos_head_update(tmp_path, '{".*head/kernel": {"eta": 0.01, "shape": [4, 1]}}')
    # Default eta for a (4, 3) kernel: sqrt(1 / fan_in) = 0.5; the update scales with eta.
    np.testing.assert_allclose(ruled / default, 0.01 / 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="rules.json.*not a number"):
        amos_head_update(tmp_path, '{".*": {"eta": [1, "x"]}}')

"""Export a run's model to another checkpoint format: T5X (every family) or the official
ViT/Mixer ``.npz`` layout.

The exported weights are those evaluation uses: the EMA parameters when the run keeps an EMA,
else the trained parameters, of the newest readable checkpoint (or ``step``). Both files read
back through ``--set init.checkpoint=OUT`` (the format is detected) with the very bits saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

EXPORT_FORMATS = ("t5x", "npz")


def model_tree(model: nnx.Module) -> dict:
    """The parameters of ``model`` as a nested dict of NumPy arrays with string keys."""

    def strings(node) -> Any:
        if isinstance(node, dict):
            return {str(k): strings(v) for k, v in node.items()}
        return np.asarray(jax.device_get(node))

    return strings(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def export_run(
    workdir: str | Path, out: str | Path, fmt: str = "t5x", step: int | None = None
) -> Path:
    """Writes the model of the run in ``workdir`` to ``out`` in format ``fmt`` and returns the
    written path: ``out/checkpoint_<step>`` for T5X, the ``.npz`` file for ``npz``.

    Nothing is overwritten: an existing T5X step or ``.npz`` file is a one-line error.
    """
    from flaxlab.train.estimator import Estimator, load_config

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; accepted: {list(EXPORT_FORMATS)}")
    out = Path(out)
    config = load_config(workdir)
    estimator = Estimator(config, workdir, progress=False)
    found, state = estimator._restore_model_state(step)
    params = estimator._model_params(state)
    model = nnx.merge(estimator.graphdef, params, state["rest"])
    if fmt == "npz":
        from flaxlab.models.pretrained import save_pretrained

        if out.suffix != ".npz":
            raise ValueError(f"--format npz writes an .npz file; got {str(out)!r}")
        if out.exists():
            raise ValueError(f"{out} exists already; not overwriting it")
        if getattr(model, "pretrained_arrays", None) is None:
            raise ValueError(
                f"--format npz is the official ViT/Mixer layout; this run is a "
                f"{config.family!r} (use --format t5x)"
            )
        return save_pretrained(model, out)
    from flaxlab.train.t5x import save_t5x, step_dir

    if step_dir(out, found).exists():
        raise ValueError(f"{step_dir(out, found)} exists already; not overwriting it")
    return save_t5x(out, found, model_tree(model))

"""What ``flaxlab predict`` reads and writes besides the estimator's ``.npz``: the data
configuration of ``--data`` and, for images read from files, a CSV of labels."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from flaxlab.data.config import DataConfig


def labels_csv(path: Path, class_names) -> Path | None:
    """For images read from files: ``file,label,probability`` rows next to the .npz."""
    with np.load(path) as p:
        if "files" not in p.files or "prediction" not in p.files:
            return None
        files, predicted = p["files"], p["prediction"]
        confidence = p["probabilities"].max(-1) if "probabilities" in p.files else None
    table = path.with_suffix(".csv")
    tmp = table.with_name(table.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "probability"])
        for i, (file, k) in enumerate(zip(files, predicted, strict=True)):
            name = class_names[k] if class_names and k < len(class_names) else str(k)
            writer.writerow([file, name, "" if confidence is None else f"{confidence[i]:.4f}"])
    tmp.replace(table)
    return table


def data_config_for(base: DataConfig, data: str) -> DataConfig:
    """``base`` reading ``data`` for prediction: ``digits`` (the test split), an ``.npz``
    file, a CIFAR folder or an image folder (no augmentation)."""
    fields = dict(source=None, augreg=None)
    if data == "digits":
        return dataclasses.replace(base, name="digits", **fields)
    path = Path(data)
    if path.suffix == ".npz":
        return dataclasses.replace(base, name="npz", path=str(path), eval_path=str(path), **fields)
    if (path / "test_batch").exists() or (path / "test").is_file():
        return dataclasses.replace(base, name="cifar", path=str(path), **fields)
    if path.is_dir():
        return dataclasses.replace(
            base, name="image_folder", path=str(path), eval_path=str(path), **fields
        )
    raise ValueError(
        f"--data {data!r} is neither 'digits', an .npz file, a CIFAR folder nor an image folder"
    )

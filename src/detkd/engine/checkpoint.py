"""Checkpoint files: always loaded with ``torch.load(..., weights_only=True)``, always written atomically.

Two kinds:
- a *model* checkpoint ``{"model": state_dict, "meta": {...}}`` (the stage output; ``meta`` holds the
  ``DetectorSpec``, class names and category ids, provenance and final metrics: plain JSON-like values);
- a *training state* checkpoint (periodic, for resuming): model, optimiser, scheduler, scaler, the
  iteration reached and a fingerprint of the settings it was made with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detkd.errors import CheckpointError
from detkd.io import atomic_torch_save


def load_file(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` onto the CPU; ``CheckpointError`` if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, RuntimeError) for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None


def load_state_dict_file(path: str | Path) -> dict:
    """A bare state dict, or the ``model`` entry of a detkd checkpoint."""
    data = load_file(path)
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor)")
    return data


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    atomic_torch_save(path, {"model": state, "meta": meta})


SPEC_KEYS = ("family", "backbone", "num_classes", "model")


def load_model_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """Return ``(state_dict, meta)`` of a model checkpoint written by ``save_model_checkpoint``; a file
    without the metadata every reader needs (``meta.spec`` with its keys, ``meta.category_ids`` and
    ``meta.category_names`` of equal length) is a ``CheckpointError`` naming the missing key."""
    data = load_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not isinstance(data.get("meta"), dict):
        raise CheckpointError(f"{path}: not a detkd model checkpoint (expected keys 'model' and 'meta')")
    meta = data["meta"]
    spec = meta.get("spec")
    missing = ["meta.spec"] if not isinstance(spec, dict) else [f"meta.spec.{k}" for k in SPEC_KEYS if k not in spec]
    missing += [f"meta.{k}" for k in ("category_ids", "category_names") if not isinstance(meta.get(k), (list, tuple))]
    if missing:
        raise CheckpointError(f"{path}: detkd model checkpoint without {', '.join(missing)} "
                              "(written by another version or tool; re-run the stage that made it)")
    if len(meta["category_ids"]) != len(meta["category_names"]):
        raise CheckpointError(f"{path}: meta.category_ids ({len(meta['category_ids'])}) and meta.category_names "
                              f"({len(meta['category_names'])}) differ in length")
    return data["model"], meta


def check_same_classes(path: str | Path, meta: dict, category_ids, where: str) -> None:
    """``CheckpointError`` when the checkpoint's classes (``meta.category_ids``) are not ``category_ids``,
    the classes of ``where`` (e.g. "the val split"): its labels would name the wrong objects."""
    if [int(c) for c in meta["category_ids"]] != [int(c) for c in category_ids]:
        raise CheckpointError(f"{path}: trained on category ids {list(meta['category_ids'])} but {where} has "
                              f"{list(category_ids)}")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model

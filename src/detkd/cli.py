"""Shared plumbing for the stage entries in ``pipeline/``: one-line errors, seeding, fingerprints."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import Callable

import numpy as np
import torch

from detkd.errors import ConfigError, DetkdError


def run_main(main: Callable[[], None]) -> None:
    """Call ``main``; a ``DetkdError`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        main()
    except DetkdError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; periodic checkpoints (if any) are kept and the next run resumes from them", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (initialisation); data order is seeded separately by the sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fingerprint(*parts) -> str:
    """Stable short hash of JSON-serialisable ``parts`` (decides whether a saved training state fits)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parse_named_models(items: list[str]) -> dict[str, str]:
    """``NAME=CHECKPOINT`` pairs -> {name: path}; a malformed or repeated name is a one-line error."""
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=CHECKPOINT, e.g. --model student=models/student.pt")
        if name in models:
            raise ConfigError(f"--model: the name {name!r} is given twice")
        models[name] = path
    return models

"""Make the stage entries import ``detkd`` from the checkout they live in (``../src``), first on ``sys.path``.

``dvc exp run --queue`` runs each experiment in its own copy of the repository; an editable install
(``make setup``) points every copy at the workspace's ``src/``, so an experiment would otherwise run
whatever code the workspace holds at that moment instead of the code of its own commit.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)

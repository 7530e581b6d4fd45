"""Latency benchmark of every artefact on the machine it runs on (the ``benchmark`` stage's library half)."""

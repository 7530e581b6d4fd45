"""Atomic file output: write to a temporary file in the same directory, then ``os.replace``.

A crash (or Ctrl-C) therefore never leaves a half-written file that DVC could cache or a later stage
could read; the previous version, if any, stays intact until the new one is complete. A set of files that
belongs together (the export stage's artefacts) is written to a staging directory that then takes the old
directory's place (``staged_directory``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from detkd.errors import OutputWriteError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.
    A filesystem refusal (no space left, read-only, permission) becomes a one-line ``OutputWriteError``
    naming the place; the previous ``path`` is untouched either way."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    except OSError as exc:
        raise OutputWriteError(describe_write_error(path, exc)) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def describe_write_error(path: Path, exc: OSError) -> str:
    """One line for a failed write of ``path``: what the filesystem said, and where."""
    previous = f"; the previous {path.name} is intact" if path.exists() else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {path.parent} (writing {path.name}){previous}"
    if exc.errno == errno.EROFS:
        return f"{path.parent} is read-only (writing {path.name}){previous}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path.parent}: permission denied (writing {path.name}){previous}"
    return f"{path}: could not write ({exc.strerror or exc}){previous}"


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON with sorted keys (stable diffs for DVC metrics)."""
    atomic_write_text(path, json.dumps(_json_safe(data), indent=indent, sort_keys=True) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` through ``atomic_path``. The object is serialised in memory first and written with
    plain file I/O, so a full disk reports ENOSPC (torch's own writer says only "unexpected pos")."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())


@contextlib.contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``final`` (``.<name>.partial-<pid>``) for a set of files that belong
    together. On success it takes ``final``'s place: the old directory is renamed aside, the new one renamed
    in, then the old one deleted. On error it is deleted and ``final`` is untouched.

    A kill therefore leaves ``final`` holding the old set or the new one, never a mix (between the two
    renames, for an instant, no set). Leftovers of killed runs whose process is gone are removed on the next
    call."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if kind in (f".{final.name}.partial", f".{final.name}.old") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        os.chmod(staging, 0o777 & ~current_umask())
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

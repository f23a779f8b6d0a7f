"""Output folders and files of the command-line tools: folders checked before the work that fills them (a results
folder that turned out to be a file used to fail with a raw OSError after minutes of benchmarking), result names
that no other run takes, and strict JSON."""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Sequence

from .errors import DFQViTError


def output_folder(path, flag: str = "--out") -> Path:
    """``path`` as a folder that exists and can be written to (made with its parents when missing)."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "it or a folder above it is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else (exc.strerror or str(exc))
        raise DFQViTError(f"{flag} {str(folder)!r}: cannot make the folder ({why}); give a folder you can "
                          "write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DFQViTError(f"{flag} {str(folder)!r}: the folder is not writable; give a folder you can write to")
    return folder


def unique_stem(folder: Path, base: str, suffixes: Sequence[str] = (".json",)) -> str:
    """A file-name stem in ``folder`` that no other run holds: ``base``, else ``base-2``, ``base-3``, ... (the
    names end in a timestamp to the second, which two runs can share). A stem is taken when any
    ``<stem><suffix>`` exists; the first suffix's file is created empty with exclusive creation to reserve the
    stem, so two processes starting at once cannot both get it. The caller writes its files under it."""
    for n in itertools.count(1):
        stem = base if n == 1 else f"{base}-{n}"
        if any((Path(folder) / f"{stem}{suffix}").exists() for suffix in suffixes[1:]):
            continue
        try:
            with open(Path(folder) / f"{stem}{suffixes[0]}", "x"):
                pass
        except FileExistsError:
            continue
        return stem
    raise AssertionError("unreachable")


def finite_json(value):
    """``value`` with every NaN / infinite float replaced by None (JSON has no NaN; Python's json writes a bare
    ``NaN`` that strict readers refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path, data, indent: int = 1) -> None:
    """``data`` as strict JSON at ``path`` (non-finite floats written as null)."""
    Path(path).write_text(json.dumps(finite_json(data), indent=indent, allow_nan=False))

"""Output folders of the command-line tools, checked before the work that fills them (a results folder that
turned out to be a file used to fail with a raw OSError after minutes of benchmarking)."""
from __future__ import annotations

import os
from pathlib import Path

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

"""The bottom of the package, imported by every layer and importing none of it: the error for a user's
mistake and the atomic file write. The data layouts (`sources`) sit on it, below the schema (`config`)
that checks a `data:` value through them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for: the CLI prints its one-line message and exits 2."""


def write_atomic(path: Path, text: str):
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

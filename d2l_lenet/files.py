"""Atomic file writing: readers, and a run killed mid-write, see the old file or the new."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
  """A temporary file beside ``path``, opened for writing, that replaces ``path`` on success.

  Its directory is created if needed; the file gets mode 0o644. If the block
  raises, the temporary file is removed and ``path`` is left as it was.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(mode, dir=path.parent, suffix='.tmp', delete=False) as f:
    try:
      yield f
    except BaseException:
      f.close()
      os.unlink(f.name)
      raise
  os.chmod(f.name, 0o644)
  os.replace(f.name, path)

"""Build a folder somewhere hidden, then swap it into place, so readers never see it half-written."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from utils.errors import UserError


def build_folder_atomically(root: Path, build: Callable[[Path], None], is_current: Callable[[], bool]) -> Path:
    """Run ``build(staging)`` in a hidden sibling of ``root``, then rename it to ``root``.

    An older ``root`` is moved aside first and put back if the swap fails. When another process
    renamed its own build into place first, ``is_current()`` decides whether theirs will do.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    retired = None
    try:
        build(staging)
        if root.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, retired / root.name)
        try:
            os.rename(staging, root)
        except OSError:
            if not is_current():
                raise UserError(f"could not move the built folder into {root}; "
                                "another process may be writing there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            if not root.exists() and (retired / root.name).exists():
                os.rename(retired / root.name, root)  # the swap failed: put the old copy back
            shutil.rmtree(retired, ignore_errors=True)
    return root

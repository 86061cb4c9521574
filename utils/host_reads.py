"""Count the places where code reads a tensor back to the host (on a GPU, each one waits for
every kernel queued before it). On CUDA, ``torch.cuda.set_sync_debug_mode`` sees the real
synchronizations; on a CPU nothing synchronizes, so this counts the Python-level conversions
that would (``.item()``, ``bool()``, ``float()``, ``.tolist()``, ``.cpu()``, ...), by the file
of this repository that asked for them."""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__")
# torch's own Tensor helpers (e.g. __format__ calling item): the read belongs to their caller.
TENSOR_HELPERS = (str(Path("torch") / "_tensor.py"),)


@contextlib.contextmanager
def count_host_reads():
    """Yields a Counter: repository file (relative path) -> tensor-to-host conversions it made.
    Reads made inside libraries are theirs and left out (torch's optimizers read their step
    counters, which stay on the host even for CUDA parameters)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(original):
        def counted(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(TENSOR_HELPERS):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(str(REPO) + os.sep):
                counts[Path(frame.f_code.co_filename).relative_to(REPO).as_posix()] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

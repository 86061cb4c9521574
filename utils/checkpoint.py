"""Checkpoint files: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors, numbers, strings and containers of them (no pickled
objects), so loading one never runs code from the file. Two kinds: ``last.pt`` carries the
whole training state (resume); ``best.pt`` only what evaluation and inference need (weights,
options, classes, epoch and metrics), about a third of last.pt's size under Adam.
``--keep-checkpoints`` says which of them a finished run keeps.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a broken file;
    temporaries that killed writers left behind are removed after a successful write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must not reach the disk before the data
    os.replace(tmp, path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary checkpoint files a killed run left in ``run_dir``."""
    for stale in Path(run_dir).glob(".*.pt.tmp-*"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """The payload of a checkpoint; a truncated or foreign file is a user error naming it."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be read ({first_line[:160]}); "
                        "it is truncated or not a checkpoint of this project") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"checkpoint {path} is not a checkpoint of this project (no model state)")
    return payload


INFERENCE_KIND = "inference"  # best.pt's "kind"; last.pt has none


def load_training_checkpoint(path: Path) -> dict:
    """A checkpoint that can be resumed from; best.pt (weights only) is refused by name."""
    payload = load_checkpoint(path)
    if payload.get("kind") == INFERENCE_KIND or "optimizers" not in payload:
        raise UserError(f"--resume {path} holds weights only (an inference checkpoint, like best.pt); "
                        "resume from the run folder or its last.pt")
    return payload


def prune_checkpoints(run_dir: Path, keep: str) -> list[Path]:
    """Remove what ``--keep-checkpoints`` does not keep once a run has finished; returns
    the removed files. (last.pt is written during training whatever the choice.)"""
    wanted = {"all": ("best.pt", "last.pt"), "last": ("last.pt",), "best": ("best.pt",), "none": ()}
    if keep not in wanted:
        raise UserError(f"--keep-checkpoints {keep!r} is not one of: {', '.join(wanted)}")
    removed = []
    for name in ("best.pt", "last.pt"):
        path = Path(run_dir) / name
        if name not in wanted[keep] and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def resume_path(resume: str) -> Path:
    """``--resume`` names a run folder (its last.pt) or a checkpoint file."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint found (expected a run folder with last.pt or a .pt file)")
    return path


def saved_config(resume: str) -> dict:
    """The run options stored in the checkpoint ``--resume`` names, without the ones that
    say where this run writes (those come from the command line). A folder without last.pt
    (e.g. a cross-validation folder holding one run per fold) gives none."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise UserError(f"--resume {resume} does not exist")
    if path.is_dir() and not (path / "last.pt").is_file():
        return {}
    payload = load_checkpoint(resume_path(resume), mmap=True)
    config = dict(payload.get("config") or {})
    for key in ("resume", "out"):
        config.pop(key, None)
    return config


def rng_state() -> dict:
    """Every random state the run draws from, as tensors and plain numbers (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

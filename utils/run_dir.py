"""The run folder: where a run writes its config, metrics, checkpoints and results."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from utils import distributed
from utils.errors import UserError


def prepare_run_dir(cfg, name: str) -> Path:
    """``--out`` or ``runs/<name>-<time>``; refuses to overwrite a finished or started run
    unless it is being resumed."""
    if cfg.resume and not cfg.out:
        resume = Path(cfg.resume).expanduser()
        run_dir = resume if resume.is_dir() else resume.parent
    elif cfg.out:
        run_dir = Path(cfg.out).expanduser()
    else:
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.resume and any((run_dir / f).exists() for f in ("last.pt", "results.json", "metrics.jsonl")):
        raise UserError(f"--out {run_dir} already holds a run; pass --resume {run_dir} or choose another --out")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir

"""Run-folder logging: one JSON line per epoch in metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def flatten(row: dict, prefix: str = "") -> dict[str, float]:
    """{"val": {"fusion": {"acc": 0.9}}} -> {"val/fusion/acc": 0.9} for TensorBoard tags."""
    flat = {}
    for key, value in row.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[tag] = float(value)
    return flat


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events in ``run_dir`` (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard")) if enabled else None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop rows of epochs that will be run again."""
        if not (self.enabled and self.metrics_path.exists()):
            return
        rows = read_metrics(self.metrics_path)
        kept = [json.dumps(r) for r in rows if r["epoch"] <= epoch]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for tag, value in flatten({k: v for k, v in row.items() if k != "epoch"}).items():
            self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, payload: dict) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)

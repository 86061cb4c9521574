"""Where a figure came from: the machine, the command and the load, written beside the figure.

Every number the README and docs/ publish is a file a script wrote (``docs/results/*.md``),
headed by :func:`provenance_header`; ``python -m utils.docs`` copies those files into the
README and docs between ``<!-- generated: PATH -->`` and ``<!-- end generated -->`` markers.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name as ``lscpu`` gives it (else what ``platform`` knows)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def gpu_model() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install just means "no GPU" here
        return None
    return None


def library_versions() -> str:
    """The versions the printed numbers depend on (they differ between torch releases)."""
    from importlib import metadata

    parts = []
    for name in ("torch", "numpy"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def pinned_cores() -> list[int] | None:
    """The cores this process is pinned to, when that is fewer than the machine has."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed if len(allowed) < (os.cpu_count() or len(allowed)) else None


def machine_summary() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cpu_model()}, {cores} cores", library_versions()]
    gpu = gpu_model()
    if gpu:
        parts.append(gpu)
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        parts.append(f"load average {load}")
    except OSError:
        pass
    return "; ".join(parts)


REPOSITORY = Path(__file__).resolve().parents[1]


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: paths inside the checkout relative, and
    ``taskset -c CORES`` in front when the process is pinned (the figure depends on it)."""
    if argv is None:
        argv = list(sys.argv)
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and argv:  # run as `python -m package.module`
            argv = ["python", "-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    words = [a.replace(f"{REPOSITORY}/", "") for a in argv]
    if words and words[0].endswith(".py") and not words[0].startswith("python"):
        words.insert(0, "python")
    pinned = pinned_cores()
    prefix = ["taskset", "-c", ",".join(map(str, pinned))] if pinned else []
    return " ".join(shlex.quote(a) for a in prefix + words)


def provenance_header(command: str | None = None) -> str:
    """A short italic paragraph: when, on what machine, by which command."""
    command = command or command_line()
    when = time.strftime("%Y-%m-%d", time.gmtime())
    return f"_Written by `{command}` on {when}; machine: {machine_summary()}._\n"


def write_report(path: str | Path, body: str, command: str | None = None) -> Path:
    """Write ``body`` (markdown) to ``path`` under a provenance header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(provenance_header(command) + "\n" + body.rstrip() + "\n")
    return path

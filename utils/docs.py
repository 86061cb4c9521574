"""Refresh the generated blocks of the README and docs/ from the files scripts wrote.

A block is ``<!-- generated: docs/results/NAME.md -->`` ... ``<!-- end generated -->``; its
content is replaced by that file's text (a ``.py`` file, e.g. a runnable example under
examples/, goes in as a Python code block). Nothing between the markers is typed by hand.

    python -m utils.docs            # rewrite README.md and docs/*.md in place
    python -m utils.docs --check    # exit 1 if a block is stale or its file is missing
    python -m utils.docs --rerun    # rerun every included report's recorded command, then refill
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READ_START, READ_END = "# readme: start", "# readme: end"
BLOCK = re.compile(r"(<!-- generated: (?P<src>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def included_text(source: Path) -> str:
    """A results file as it is; a Python file as a fenced block, only its lines between
    ``# readme: start`` and ``# readme: end`` when it has them (a runnable example's core)."""
    text = source.read_text()
    if source.suffix != ".py":
        return text
    lines = text.splitlines()
    if READ_START in lines and READ_END in lines:
        lines = lines[lines.index(READ_START) + 1:lines.index(READ_END)]
    return "```python\n" + "\n".join(lines).strip("\n") + "\n```\n"


def refresh(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """The text with every block filled from its source; also the sources that are missing."""
    missing: list[str] = []

    def fill(match: re.Match) -> str:
        source = root / match["src"]
        if not source.is_file():
            missing.append(match["src"])
            return match.group(0)
        return match.group(1) + included_text(source).rstrip() + "\n" + match.group(4)

    return BLOCK.sub(fill, text), missing


RECORDED = re.compile(r"^_Written by `(?P<command>.+)` on \d{4}-\d{2}-\d{2}; machine: ")


def included_reports(root: Path = ROOT) -> list[str]:
    """Every docs/results file a generated block includes, each once, in document order."""
    seen: list[str] = []
    for doc in documents(root):
        if doc.is_file():
            for match in BLOCK.finditer(doc.read_text()):
                if match["src"].startswith("docs/results/") and match["src"] not in seen:
                    seen.append(match["src"])
    return seen


def recorded_command(report: Path, root: Path = ROOT) -> str | None:
    """The command a report's provenance header names, runnable from the repository root
    (``python`` prepended to a bare script, this checkout's absolute path removed)."""
    match = RECORDED.match(report.read_text().split("\n", 1)[0])
    if not match:
        return None
    command = match["command"].replace(f"{root}/", "")
    if command.split()[0].endswith(".py"):
        command = "python " + command
    return command


RECORDED_TORCH = re.compile(r"; torch (?P<version>[^,;]+)")


def environment_flags(root: Path = ROOT) -> list[str]:
    """One line per included report written under another torch than this environment's (or
    whose header does not say): its numbers may not be what this installation prints."""
    from importlib import metadata

    current = metadata.version("torch")
    flags = []
    for source in included_reports(root):
        path = root / source
        if not path.is_file():
            continue
        header = path.read_text().split("\n", 1)[0]
        recorded = RECORDED_TORCH.search(header)
        if recorded is None:
            flags.append(f"{source}: the torch version it was produced under is not recorded (this environment: "
                         f"torch {current}); rerun its command to refresh it")
        elif recorded["version"].strip() != current:
            flags.append(f"{source}: produced under torch {recorded['version'].strip()}, this environment has torch "
                         f"{current}; its numbers may differ here")
    return flags


def rerun(root: Path = ROOT, skip: tuple[str, ...] = ()) -> int:
    """Rerun the recorded command of every included report (``$PYTHON`` for ``python``);
    reports whose command reads temporary run folders are named and left as they are."""
    import os
    import subprocess

    status = 0
    python = os.environ.get("PYTHON", sys.executable)
    for source in included_reports(root):
        name = Path(source).stem
        path = root / source
        if name in skip:
            continue
        if not path.is_file():
            print(f"warning: {source} does not exist yet: no command to rerun", file=sys.stderr)
            status = 1
            continue
        command = recorded_command(path, root)
        if command is None or "/tmp/" in command:
            print(f"warning: {source} is not regenerated (its command: {command or 'not recorded'})", file=sys.stderr)
            continue
        if command.startswith("python "):
            command = f"{python} {command[len('python '):]}"
        print(f"== {source}: {command}", flush=True)
        if subprocess.run(command, shell=True, cwd=root).returncode != 0:
            print(f"error: {source}: the command failed", file=sys.stderr)
            status = 1
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks; change nothing")
    parser.add_argument("--rerun", action="store_true",
                        help="first rerun the command recorded in every included report, then refill")
    parser.add_argument("--skip", nargs="*", default=[], help="report names (e.g. main-job) --rerun leaves alone")
    args = parser.parse_args(argv)
    status = rerun(ROOT, tuple(args.skip)) if args.rerun else 0
    for flag in environment_flags():
        print(f"flagged: {flag}", file=sys.stderr)
    for doc in documents():
        if not doc.is_file():
            continue
        text = doc.read_text()
        new, missing = refresh(text)
        for source in missing:
            print(f"error: {doc.relative_to(ROOT)} includes {source}, which does not exist", file=sys.stderr)
            status = 1
        if new != text:
            if args.check:
                print(f"stale: {doc.relative_to(ROOT)}")
                status = 1
            else:
                doc.write_text(new)
                print(f"updated {doc.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())

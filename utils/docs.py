"""Refresh the generated blocks of the README and docs/ from the files scripts wrote.

A block is ``<!-- generated: docs/results/NAME.md -->`` ... ``<!-- end generated -->``; its
content is replaced by that file's text. Nothing between the markers is typed by hand.

    python -m utils.docs            # rewrite README.md and docs/*.md in place
    python -m utils.docs --check    # exit 1 if a block is stale or its file is missing
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<src>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def refresh(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """The text with every block filled from its source; also the sources that are missing."""
    missing: list[str] = []

    def fill(match: re.Match) -> str:
        source = root / match["src"]
        if not source.is_file():
            missing.append(match["src"])
            return match.group(0)
        return match.group(1) + source.read_text().rstrip() + "\n" + match.group(4)

    return BLOCK.sub(fill, text), missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks; change nothing")
    args = parser.parse_args(argv)
    status = 0
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

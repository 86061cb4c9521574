"""Published figures come from files scripts wrote: every generated block of the README and
docs/ names an existing source and holds exactly its text (python -m utils.docs --check)."""
import subprocess
import sys

from utils import docs
from utils.docs import ROOT


def test_every_generated_block_is_in_sync_with_its_source():
    done = subprocess.run([sys.executable, "-m", "utils.docs", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_refresh_fills_blocks_and_reports_missing_sources(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "a.md").write_text("figure 1\n")
    (tmp_path / "example.py").write_text("import os\n# readme: start\nprint(1)\n# readme: end\nx = 2\n")
    text = ("<!-- generated: docs/results/a.md -->\nold\n<!-- end generated -->\n"
            "<!-- generated: example.py -->\n<!-- end generated -->\n"
            "<!-- generated: docs/results/gone.md -->\n<!-- end generated -->\n")
    new, missing = docs.refresh(text, tmp_path)
    assert missing == ["docs/results/gone.md"]
    assert "figure 1\n<!-- end" in new and "old" not in new
    assert "```python\nprint(1)\n```\n<!-- end" in new and "import os" not in new


def test_every_included_report_records_the_command_that_wrote_it():
    """What `bash scripts/make_docs.sh` (python -m utils.docs --rerun) reruns."""
    script = (ROOT / "scripts" / "make_docs.sh").read_text()
    assert "-m utils.docs --rerun" in script and "-m utils.docs --check" in script
    for source in docs.included_reports():
        path = ROOT / source
        assert path.is_file(), f"{source} is included but missing"
        assert docs.recorded_command(path), f"{source} has no provenance header (utils.provenance.write_report)"


def test_recorded_commands_are_runnable_from_the_checkout(tmp_path):
    report = tmp_path / "r.md"
    report.write_text(f"_Written by `{ROOT}/benchmarks/x.py --report r.md` on 2026-01-02; machine: CPU, 2 cores._\n")
    assert docs.recorded_command(report, ROOT) == "python benchmarks/x.py --report r.md"
    report.write_text("# hand-typed table\n")
    assert docs.recorded_command(report, ROOT) is None


def test_reports_from_another_torch_or_without_versions_are_flagged(tmp_path, monkeypatch):
    from importlib import metadata

    from utils.provenance import provenance_header

    header = provenance_header("python benchmarks/x.py --report docs/results/a.md")
    assert f"torch {metadata.version('torch')}" in header and "numpy " in header
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    (tmp_path / "README.md").write_text("<!-- generated: docs/results/a.md -->\n<!-- end generated -->\n"
                                        "<!-- generated: docs/results/b.md -->\n<!-- end generated -->\n"
                                        "<!-- generated: docs/results/c.md -->\n<!-- end generated -->\n")
    (results / "a.md").write_text(header)
    (results / "b.md").write_text(header.replace(f"torch {metadata.version('torch')}", "torch 1.0.0"))
    (results / "c.md").write_text("_Written by `python x.py` on 2026-01-02; machine: CPU, 2 cores._\n")
    monkeypatch.setattr(docs, "documents", lambda root=tmp_path: [tmp_path / "README.md"])
    flags = docs.environment_flags(tmp_path)
    assert len(flags) == 2 and flags[0].startswith("docs/results/b.md: produced under torch 1.0.0")
    assert flags[1].startswith("docs/results/c.md: the torch version it was produced under is not recorded")


def test_recorded_commands_drop_the_checkout_path_and_say_when_cores_were_pinned(monkeypatch):
    from utils import provenance

    monkeypatch.setattr(provenance, "pinned_cores", lambda: [1])
    command = provenance.command_line([f"{provenance.REPOSITORY}/benchmarks/bench_startup.py", "--report", "r.md"])
    assert command == "taskset -c 1 python benchmarks/bench_startup.py --report r.md"

"""Every shell script runs the interpreter named by $PYTHON (as the docs say), never a bare
`python` that may be another environment's."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALL_LOG"
"""

# script arguments -> what the call must contain
CALLS = [
    (["run_logits_com.sh", "cpu", "--epochs", "1"],
     "main.py --dataset AVDigitsImbalanced --method olm --device cpu --epochs 1"),
    (["run_logits.sh", "cpu", "--epochs", "1"], "main.py --dataset AVDigitsImbalanced --method olm_loss_ratio --device cpu --epochs 1"),
    (["run_logits.sh", "cpu", "CREMAD"], "main.py --dataset CREMAD --method olm_loss_ratio --device cpu"),
    (["run_trans_logits_com.sh", "cpu", "mbt"], "main_trans.py --model-type mbt --method olm --device cpu"),
    (["run_trans_logits.sh", "cpu", "ca"], "main_trans.py --model-type ca --method olm_loss_ratio --device cpu"),
    (["run_ddp.sh", "2", "cpu"], "-m torch.distributed.run --standalone --nproc_per_node 2 main.py"),
    (["make_docs.sh"], "-m utils.docs --rerun"),
]


@pytest.mark.parametrize("argv, expected", CALLS, ids=[c[0][0] for c in CALLS])
def test_scripts_honour_PYTHON(tmp_path, argv, expected):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "CALL_LOG": str(log), "PATH": "/usr/bin:/bin"}  # no real python
    done = subprocess.run(["bash", str(REPO / "scripts" / argv[0]), *argv[1:]], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert any(expected in call for call in calls), calls


def test_every_script_that_runs_python_reads_PYTHON():
    for script in sorted((REPO / "scripts").glob("*.sh")):
        text = script.read_text()
        code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        bare = [line for line in code if line.lstrip().startswith(("python ", "exec python "))]
        assert not bare, f"{script.name} runs a bare python: {bare}"

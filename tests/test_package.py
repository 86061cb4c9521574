"""`pip install .` installs the methods package alone (``olmbalance``, torch only), and one
method's training step runs from it outside the repository."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUTSIDE = textwrap.dedent('''
    import importlib.metadata, importlib.util, sys
    import torch
    import torch.nn.functional as F
    import olmbalance
    from olmbalance import LogitModulator, build_method

    assert "site-packages" in olmbalance.__file__, olmbalance.__file__
    # Only the methods package was installed: nothing that shadows common names.
    for name in ("config", "datasets", "utils", "engines", "models"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in str(spec.origin) or name == "datasets", name
    tops = {f.parts[0] for f in importlib.metadata.files("olmbalance")}
    assert tops <= {"olmbalance", "olmbalance-0.1.0.dist-info"}, tops

    torch.manual_seed(0)
    heads = ("audio", "visual", "fusion")
    encoders = {m: torch.nn.Linear(6, 8) for m in ("audio", "visual")}
    classifiers = torch.nn.ModuleDict({"audio": torch.nn.Linear(8, 3), "visual": torch.nn.Linear(8, 3),
                                       "fusion": torch.nn.Linear(16, 3)})
    def forward(x):
        f = {m: torch.relu(encoders[m](x[m])) for m in encoders}
        return {"audio": classifiers["audio"](f["audio"]), "visual": classifiers["visual"](f["visual"]),
                "fusion": classifiers["fusion"](torch.cat([f["audio"], f["visual"]], 1))}
    method = build_method("olm", heads, reference_steps=1)
    params = [p for m in encoders.values() for p in m.parameters()] + list(classifiers.parameters())
    net_opt = torch.optim.Adam(params, lr=1e-3)
    coef_opt = torch.optim.Adam(method.coefficient_parameters(), lr=1e-2)
    before = method.modulator.coefficients.detach().clone()
    for step in range(3):
        x = {m: torch.randn(16, 6) for m in encoders}
        y = torch.randint(0, 3, (16,))
        logits = forward(x)
        losses = {h: F.cross_entropy(z, y) for h, z in method.scale(logits).items()}
        net_opt.zero_grad(); coef_opt.zero_grad()
        method.network_loss(losses).backward()
        with torch.no_grad():
            held = {h: F.cross_entropy(z, y) for h, z in method.scale(forward(x)).items()}
        method.coefficient_loss(logits, {h: l.detach() for h, l in losses.items()}, held).backward()
        net_opt.step(); coef_opt.step()
    assert not torch.equal(before, method.modulator.coefficients.detach())
    assert isinstance(LogitModulator(heads), torch.nn.Module)
    print("outside ok", sorted(olmbalance.METHODS)[:3])
''')


def test_pip_install_gives_the_methods_package_usable_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "olmbalance", source / "olmbalance", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # torch comes from the machine's site-packages: the test installs nothing from the network.
    # The venv gets no pip (nor an older setuptools) of its own: this pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(python), "-c", OUTSIDE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "outside ok" in run.stdout

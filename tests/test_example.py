"""The README's LogitModulator example is a file that runs: on a toy model it trains the
coefficients, uses every training batch, reshuffles the held-out set at every pass and
leaves normalization statistics to the training batches; the README shows that file."""

import torch

from examples import logit_modulator_loop as example
from utils.docs import ROOT, refresh

HEADS = ("audio", "visual", "fusion")


def test_example_trains_the_coefficients_and_uses_every_batch(monkeypatch):
    torch.manual_seed(0)
    train, val = example.toy_loaders(samples=96, batch_size=16)
    model = example.TwoModalityNet()
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: calls.append((model.training, len(x))) or forward(x))
    modulator = example.train_with_olm(model, HEADS, train, val, epochs=2)
    train_forwards = [n for training, n in calls if training]
    assert sum(train_forwards) == 2 * 72                  # every training sample, each epoch
    assert len(calls) == 2 * 2 * len(train)               # one held-out forward per step
    assert int(modulator.reference_count) == len(train)   # reference window: one epoch
    assert not torch.allclose(modulator.coefficients.detach(), torch.ones(3))
    assert torch.isfinite(modulator.coefficients).all()


def test_heldout_stream_reshuffles_each_pass():
    _, val = example.toy_loaders(samples=96, batch_size=8)
    stream = example.reshuffled(val)
    first = torch.cat([next(stream)[1] for _ in range(len(val))])
    second = torch.cat([next(stream)[1] for _ in range(len(val))])
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)


def test_heldout_pass_leaves_running_statistics_alone(monkeypatch):
    torch.manual_seed(0)
    train, val = example.toy_loaders(samples=64, batch_size=16)
    model = example.TwoModalityNet()
    bn = model.encoders[0][1]
    updates = []
    bn.register_forward_hook(lambda m, i, o: updates.append(int(m.num_batches_tracked)))
    example.train_with_olm(model, HEADS, train, val, epochs=1)
    # Training forwards (even positions) count one batch each; held-out ones leave the count.
    assert updates == [k for k in range(1, len(train) + 1) for _ in range(2)]


def test_example_runs_as_a_script(capsys):
    example.main(["--epochs", "1"])  # its own imports: python -m examples.logit_modulator_loop
    assert capsys.readouterr().out.startswith("coefficients: {'audio':")


def test_readme_shows_the_example_file():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- generated: examples/logit_modulator_loop.py -->" in readme
    refreshed, missing = refresh(readme)
    assert not missing and refreshed == readme, "README's example is stale: run python -m utils.docs"
    assert "def train_with_olm" in readme and "itertools.cycle" in readme and "from olmbalance.olm import" in readme

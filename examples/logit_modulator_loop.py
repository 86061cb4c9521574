"""OLM in your own training loop: LogitModulator with any model whose forward returns one
logit tensor per head. Run it (a toy two-modality problem, CPU, seconds): python -m examples.logit_modulator_loop"""
import argparse

# readme: start
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from olmbalance.olm import LogitModulator, heldout_forward


def reshuffled(loader):
    """Endless batches; unlike itertools.cycle, every pass over ``loader`` is reshuffled."""
    while True:
        yield from loader


def train_with_olm(model, heads, train_loader, val_loader, epochs=1, lr=1e-3):
    """``model(x)`` returns {head: (B, classes) logits}; returns the trained LogitModulator."""
    steps = len(train_loader)                            # reference window: the first epoch;
    modulator = LogitModulator(heads, target="rate", reference_steps=steps,  # L0 = mean of its
                               reference_tail=max(1, -(-steps // 4)))       # last quarter
    net_opt = torch.optim.Adam(model.parameters(), lr=lr)
    coef_opt = torch.optim.Adam([modulator.coefficients], lr=1e-3)
    heldout = reshuffled(val_loader)                     # drawn on its own: every train batch is used
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            net_opt.zero_grad()
            coef_opt.zero_grad()
            logits = model(x)                            # head -> raw logits z_k
            scaled = modulator.scale(logits)             # head -> w_k * z_k
            train_losses = {h: F.cross_entropy(scaled[h], y) for h in heads}
            sum(train_losses.values()).backward()        # reaches the network and w

            hx, hy = next(heldout)                       # held-out losses, measured like the training
            with heldout_forward(model), torch.no_grad():  # ones: batch statistics, running stats
                hscaled = modulator.scale(model(hx))     # and dropout untouched, no gradients
                heldout_losses = {h: F.cross_entropy(hscaled[h], hy) for h in heads}

            modulator.norm_loss(logits, train_losses, heldout_losses).backward()  # trains w only
            net_opt.step()
            coef_opt.step()
            # modulator.last holds ratios, targets_mean, norms_mean, G, C for logging
    return modulator                                     # predict with the raw logits z, not w * z
# readme: end


class TwoModalityNet(nn.Module):
    """A toy late-fusion model: one encoder and head per modality plus a fusion head."""

    def __init__(self, dims=(8, 8), classes=4, width=16):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU())
                                      for d in dims)
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _ in dims)
        self.fusion = nn.Linear(width * len(dims), classes)
        self.split = list(dims)

    def forward(self, x):
        features = [encode(part) for encode, part in zip(self.encoders, x.split(self.split, dim=1))]
        logits = {name: head(f) for name, head, f in zip(("audio", "visual"), self.heads, features)}
        logits["fusion"] = self.fusion(torch.cat(features, dim=1))
        return logits


def toy_loaders(samples=256, classes=4, batch_size=32, seed=0):
    """A strong first modality and a weak, noisy second one (an imbalanced pair)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (samples,), generator=generator)
    centers = torch.randn(classes, 16, generator=generator)
    noise = torch.cat([0.5 * torch.ones(8), 3.0 * torch.ones(8)])
    inputs = centers[labels] + noise * torch.randn(samples, 16, generator=generator)
    split = samples * 3 // 4
    train = DataLoader(TensorDataset(inputs[:split], labels[:split]), batch_size=batch_size, shuffle=True,
                       generator=generator)
    val = DataLoader(TensorDataset(inputs[split:], labels[split:]), batch_size=batch_size, shuffle=True,
                     generator=generator)
    return train, val


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs [3]")
    parser.add_argument("--seed", type=int, default=0, help="random seed [0]")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = toy_loaders(seed=args.seed)
    modulator = train_with_olm(TwoModalityNet(), ("audio", "visual", "fusion"), train, val, epochs=args.epochs)
    print("coefficients:", {h: round(float(w), 3) for h, w in zip(modulator.heads, modulator.coefficients.detach())})
    return modulator


if __name__ == "__main__":
    main()

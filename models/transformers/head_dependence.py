"""How much each unimodal head depends on each modality's input: gradient norms.

For head h and modality m: the norm of d(sum of h's logits)/d(input m) over a batch.
A head that reads only its own modality has zero gradient from the others; OLM scales
a head's logits as that modality's, so a head dominated by another modality's input
would have OLM balance the wrong modality.
"""
from __future__ import annotations

import torch


def random_inputs(model, batch_size=4, steps=12, seed=0):
    """Random (B, T, D) inputs for every modality, ragged real lengths, masks True on real steps."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"masks": {}}
    lengths = torch.linspace(steps, max(1, steps // 2), batch_size).round().long()
    for name in model.modalities:
        inputs[name] = torch.randn(batch_size, steps, model.input_dims[name], generator=generator)
        inputs["masks"][name] = torch.arange(steps)[None, :] < lengths[:, None]
    return inputs


def input_gradient_norms(model, inputs) -> dict[str, dict[str, float]]:
    """head -> modality -> gradient norm, for every unimodal head (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    norms = {}
    try:
        for head in model.modalities:
            leaves = {m: inputs[m].detach().clone().requires_grad_(True) for m in model.modalities}
            logits = model({**leaves, "masks": inputs["masks"]})
            gradients = torch.autograd.grad(logits[head].sum(), [leaves[m] for m in model.modalities],
                                            allow_unused=True)
            norms[head] = {m: 0.0 if g is None else float(g.norm())
                           for m, g in zip(model.modalities, gradients)}
    finally:
        model.train(was_training)
    return norms


def own_over_other(norms: dict[str, dict[str, float]]) -> dict[str, float]:
    """head -> its own input's gradient norm over the largest other one (inf when those are 0)."""
    ratios = {}
    for head, by_input in norms.items():
        other = max(v for m, v in by_input.items() if m != head)
        ratios[head] = float("inf") if other == 0 else by_input[head] / other
    return ratios

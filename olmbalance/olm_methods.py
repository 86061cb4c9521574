"""OLM as a method of the loop: a ``LogitModulator`` over every head (``olm``, ``olm_loss_ratio``,
``olm_mean``)."""
from __future__ import annotations

from typing import Sequence

from olmbalance.base import Method
from olmbalance.olm import LogitModulator
from olmbalance.registry import RunContext, register_method


class OLM(Method):
    """Online Logit Modulation with a ``LogitModulator`` over every head."""

    def __init__(self, heads: Sequence[str], context: RunContext, target: str = "rate",
                 target_scale: str | None = None):
        super().__init__(heads, context)
        self.name = "olm" if target == "rate" else "olm_loss_ratio"
        self.modulator = LogitModulator(heads, target=target, target_scale=target_scale or context.target_scale,
                                        reference_steps=context.reference_steps,
                                        reference_tail=context.reference_tail)
        self.needs_heldout = target == "rate"

    def scale(self, logits):
        return self.modulator.scale(logits)

    def coefficient_parameters(self):
        return [self.modulator.coefficients]

    def heldout_due(self):
        # The reference window's tail is measured on a fresh held-out batch every step: every
        # later G is a difference from it, so its noise would bias G for the whole run, while
        # the noise of the losses reused between passes averages out over the steps.
        return self.needs_heldout and self.modulator.in_reference_tail

    def coefficient_loss(self, logits, train_losses, heldout_losses=None):
        return self.modulator.norm_loss(logits, train_losses, heldout_losses)

    def coefficients(self):
        return {h: float(w) for h, w in zip(self.heads, self.modulator.coefficients.detach().cpu())}

    def diagnostics(self):
        return dict(self.modulator.last)


# OLM's options keep the training scripts' documented flags (--target-scale, --reference-steps,
# --reference-tail, --heldout-*, --coef-lr); they reach the method through the RunContext.
@register_method("olm", summary="Online Logit Modulation, rate target (OLM-com, the method)")
def olm(heads, context):
    return OLM(heads, context, target="rate")


@register_method("olm_loss_ratio", summary="OLM with the loss-ratio target (the released engines_logits variant)")
def olm_loss_ratio(heads, context):
    return OLM(heads, context, target="loss_ratio")


@register_method("olm_mean", summary="OLM's rate target with ratios that average 1 (target_scale mean)")
def olm_mean(heads, context):
    return OLM(heads, context, target="rate", target_scale="mean")

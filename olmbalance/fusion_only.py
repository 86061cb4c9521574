"""``fusion_only``: the classical joint training of the modality-imbalance literature. The
encoders learn from the fusion loss alone; the unimodal heads are linear read-outs on detached
features, trained only to measure what each encoder learned."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from olmbalance.base import Method
from olmbalance.distributed import unwrap
from olmbalance.errors import UserError
from olmbalance.registry import RunContext, register_method


class FusionOnly(Method):
    """Encoders trained by the fusion loss only; unimodal heads are detached read-outs.

    The network loss still sums every head's CE: the read-outs' CE reaches only their own
    linear layers because the model detaches the features they read.
    """

    name = "fusion_only"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None):
        super().__init__(heads, context)
        if "fusion" not in self.heads:
            raise UserError(f"--method {self.name} needs a model with a 'fusion' head; "
                            f"this one has {', '.join(self.heads)}")
        self.modalities = tuple(h for h in self.heads if h != "fusion")

    def setup(self, model: nn.Module) -> None:
        net = unwrap(model)
        if not hasattr(net, "detach_unimodal_heads"):
            raise UserError(f"--method {self.name} needs a late-fusion model with detachable "
                            f"unimodal heads; {type(net).__name__} has none")
        net.detach_unimodal_heads = True


@register_method("fusion_only", summary="encoders trained by the fusion loss alone; unimodal heads are read-outs")
def fusion_only(heads, context):
    return FusionOnly(heads, context)

"""``audio_only`` / ``visual_only``: only that modality's head loss trains (its encoder and
linear head); the unimodal reference a multimodal model has to beat."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from olmbalance.base import Method
from olmbalance.distributed import unwrap
from olmbalance.errors import UserError
from olmbalance.registry import RunContext, register_method


class UnimodalOnly(Method):
    """Train one modality's encoder and head alone; the other heads are never trained."""

    # Under DDP the other encoder and the fusion head get no gradient at all; a wrapper that
    # reads this flag can pass find_unused_parameters=True.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext, modality: str):
        super().__init__(heads, context)
        if modality not in self.heads:
            raise UserError(f"--method {modality}_only needs a model with a {modality!r} head; "
                            f"this one has {', '.join(self.heads)}")
        self.modality = modality
        self.name = f"{modality}_only"

    def setup(self, model: nn.Module) -> None:
        # A head that reads fused tokens (MBT, UMT, CA) trained alone is still multimodal.
        net = unwrap(model)
        if not getattr(net, "UNIMODAL_HEADS", True):
            raise UserError(f"--method {self.name} needs heads that read one modality, but "
                            f"{type(net).__name__}'s heads read {net.HEAD_INPUT}; run it with "
                            f"--model-type emt, or train the late-fusion model with main.py")

    def trained_heads(self) -> tuple[str, ...]:
        return (self.modality,)

    def selection_head(self) -> str:
        return self.modality


@register_method("audio_only", summary="the audio encoder and head trained alone (unimodal reference)")
def audio_only(heads, context):
    return UnimodalOnly(heads, context, "audio")


@register_method("visual_only", summary="the visual encoder and head trained alone (unimodal reference)")
def visual_only(heads, context):
    return UnimodalOnly(heads, context, "visual")

"""What the four mid-fusion transformers share: input checks, per-modality
embeddings, unimodal heads on the class tokens, and the dict-of-logits output.

A subclass builds its fusion layers and `self.fusion_head`, and implements
`fuse(tokens, masks) -> (tokens, fused_features)`.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models.transformers.blocks import ClassifierHead, InputEmbedding

FUSION_HEAD = "fusion"
MASKS_KEY = "masks"


def normalize_modalities(modalities):
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise ValueError(
            f"modalities must be a sequence of names such as ('audio', 'visual'), "
            f"got {modalities!r}."
        )
    names = tuple(modalities)
    if len(names) < 2:
        raise ValueError(f"mid fusion needs at least 2 modalities, got {names}.")
    if len(set(names)) != len(names):
        raise ValueError(f"modalities must be distinct, got {names}.")
    reserved = {FUSION_HEAD, MASKS_KEY}
    if reserved & set(names):
        raise ValueError(
            f"modality names {sorted(reserved)} are reserved, got {names}."
        )
    return names


def normalize_input_dims(input_dims, modalities):
    """Accept one int for all modalities, a sequence in modality order, or a dict."""
    if isinstance(input_dims, int):
        dims = {name: input_dims for name in modalities}
    elif isinstance(input_dims, Mapping):
        missing = [name for name in modalities if name not in input_dims]
        if missing:
            raise ValueError(f"input_dims has no entry for modalities {missing}.")
        dims = {name: int(input_dims[name]) for name in modalities}
    elif isinstance(input_dims, Sequence) and len(input_dims) == len(modalities):
        dims = {name: int(dim) for name, dim in zip(modalities, input_dims)}
    else:
        raise ValueError(
            f"input_dims must be an int, a dict or a sequence of {len(modalities)} "
            f"ints (one per modality {modalities}), got {input_dims!r}."
        )
    bad = {name: dim for name, dim in dims.items() if dim < 1}
    if bad:
        raise ValueError(f"input_dims must be positive, got {bad}.")
    return dims


class MidFusionTransformer(nn.Module):
    def __init__(
        self,
        modalities,
        input_dims,
        num_classes,
        d_model,
        num_layers,
        num_heads,
        dropout,
        dim_feedforward=None,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        self.modalities = normalize_modalities(modalities)
        self.heads = self.modalities + (FUSION_HEAD,)
        self.input_dims = normalize_input_dims(input_dims, self.modalities)
        self.num_classes = num_classes
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.dim_feedforward = dim_feedforward or 4 * d_model
        self.embeddings = nn.ModuleDict(
            {
                name: InputEmbedding(self.input_dims[name], d_model, dropout)
                for name in self.modalities
            }
        )
        self.unimodal_heads = nn.ModuleDict(
            {name: ClassifierHead(d_model, num_classes) for name in self.modalities}
        )

    def layer_kwargs(self):
        return dict(
            d_model=self.d_model,
            num_heads=self.num_heads,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
        )

    def _checked_step_masks(self, inputs):
        """Validate the inputs; return dict modality -> bool (B, T_m) step mask."""
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"inputs must be a dict modality -> (B, T, D) tensor, "
                f"got {type(inputs).__name__}."
            )
        missing = [name for name in self.modalities if name not in inputs]
        if missing:
            raise ValueError(
                f"inputs lack modalities {missing}; the model expects {self.modalities}."
            )
        given_masks = inputs.get(MASKS_KEY) or {}
        batch_size = inputs[self.modalities[0]].shape[0]
        step_masks = {}
        for name in self.modalities:
            steps = inputs[name]
            expected_dim = self.input_dims[name]
            if steps.dim() != 3 or steps.shape[-1] != expected_dim:
                raise ValueError(
                    f"input '{name}' must have shape (B, T, {expected_dim}), "
                    f"got {tuple(steps.shape)}."
                )
            if steps.shape[0] != batch_size:
                raise ValueError(
                    f"input '{name}' has batch size {steps.shape[0]}, "
                    f"'{self.modalities[0]}' has {batch_size}."
                )
            mask = given_masks.get(name)
            if mask is None:
                mask = torch.ones(steps.shape[:2], dtype=torch.bool, device=steps.device)
            elif tuple(mask.shape) != tuple(steps.shape[:2]):
                raise ValueError(
                    f"mask for '{name}' must have shape {tuple(steps.shape[:2])}, "
                    f"got {tuple(mask.shape)}."
                )
            step_masks[name] = mask.to(device=steps.device, dtype=torch.bool)
        return step_masks

    def embed(self, inputs):
        step_masks = self._checked_step_masks(inputs)
        tokens, masks = {}, {}
        for name in self.modalities:
            tokens[name], masks[name] = self.embeddings[name](
                inputs[name], step_masks[name]
            )
        return tokens, masks

    def fuse(self, tokens, masks):
        raise NotImplementedError

    def forward(self, inputs):
        tokens, masks = self.embed(inputs)
        tokens, fused = self.fuse(tokens, masks)
        # Index 0 is the class token of every stream.
        logits = {
            name: self.unimodal_heads[name](tokens[name][:, 0])
            for name in self.modalities
        }
        logits[FUSION_HEAD] = self.fusion_head(fused)
        return logits

"""What the four mid-fusion transformers share: input checks, per-modality
embeddings, unimodal heads on the class tokens, and the dict-of-logits output.

A subclass builds its fusion layers and `self.fusion_head`, and implements
`fuse(tokens, masks) -> (tokens, fused_features)`.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models.transformers.blocks import ClassifierHead, InputEmbedding, masked_mean

FUSION_HEAD = "fusion"
MASKS_KEY = "masks"
# Valence regression (MER2023): inputs["valence"] holds (B,) targets, NaN where unknown; the
# output carries the (B,) prediction and, when targets came in, their MSE under the key the
# training loop adds to the network loss.
VALENCE_KEY = "valence"
AUXILIARY_LOSS = "auxiliary_loss"


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
    reserved = {FUSION_HEAD, MASKS_KEY, VALENCE_KEY, AUXILIARY_LOSS}
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


def released_feedforward(ratio, d_model):
    """The released feed-forward width scaled to ``d_model`` (ratio x d_model, at least 1)."""
    return max(1, round(ratio * d_model))


class MidFusionTransformer(nn.Module):
    # Feed-forward width over d_model in the released model (at d_model 768: EMT 1024, the
    # others 2048, the PyTorch layer default they leave in place).
    FEEDFORWARD_RATIO = 8 / 3
    # Whether each modality's head reads that modality alone. Only then does a unimodal
    # baseline (audio_only, visual_only) measure one modality.
    UNIMODAL_HEADS = False
    # What a modality's head reads, for the docs and for error messages.
    HEAD_INPUT = "fused tokens"

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
        self.dim_feedforward = dim_feedforward or released_feedforward(self.FEEDFORWARD_RATIO, d_model)
        self.embeddings = nn.ModuleDict(
            {
                name: InputEmbedding(self.input_dims[name], d_model, dropout)
                for name in self.modalities
            }
        )
        self.unimodal_heads = nn.ModuleDict(
            {name: ClassifierHead(d_model, num_classes) for name in self.modalities}
        )
        self.valence_head = None

    def enable_valence(self):
        """Add a valence regressor on the fused features (what the fusion head reads), as
        MER2023's baseline trains one beside the emotion classifier; returns self."""
        self.valence_head = ClassifierHead(self.fusion_head.linear.in_features, 1)
        return self

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
        # As released, a modality's head reads the mean of that stream's real tokens (class
        # token included): every token carries its own input on the residual path, so the
        # head keeps a direct route to its modality even where the tokens also read others.
        logits = {
            name: self.unimodal_heads[name](masked_mean(tokens[name], masks[name]))
            for name in self.modalities
        }
        logits[FUSION_HEAD] = self.fusion_head(fused)
        if self.valence_head is not None:
            logits[VALENCE_KEY] = self.valence_head(fused).squeeze(-1)
            targets = inputs.get(VALENCE_KEY)
            if targets is not None:
                known = torch.isfinite(targets)
                errors = (logits[VALENCE_KEY].float() - targets.nan_to_num()) ** 2
                # Masked rather than indexed: the graph (and DDP's view of the head) stays
                # the same when a batch holds no valence at all.
                logits[AUXILIARY_LOSS] = (errors * known).sum() / known.sum().clamp(min=1)
        return logits

"""EMT: efficient multimodal transformer (intermediate representation fusion).

Each modality keeps its own self-attention stack. Alongside, a small set of pivot
tokens reads every modality at every layer (pivots as queries), and the per-modality
readings are mixed with gates computed from the modalities' class tokens. The pivots
never write back, so each unimodal head sees only its own modality.
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import (
    ClassifierHead,
    CrossAttentionLayer,
    SelfAttentionLayer,
    learned_tokens,
)


class EMT(MidFusionTransformer):
    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.num_pivots = num_bottleneck
        self.pivots = learned_tokens(num_bottleneck, d_model)
        num_modalities = len(self.modalities)
        self.unimodal_layers = nn.ModuleList(
            nn.ModuleDict(
                {name: SelfAttentionLayer(**self.layer_kwargs()) for name in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.pivot_layers = nn.ModuleList(
            nn.ModuleDict(
                {name: CrossAttentionLayer(**self.layer_kwargs()) for name in self.modalities}
            )
            for _ in range(num_layers)
        )
        # One gate per layer: the class tokens decide how much each modality's
        # reading contributes to the pivots.
        self.gates = nn.ModuleList(
            nn.Linear(num_modalities * d_model, num_modalities) for _ in range(num_layers)
        )
        self.fusion_head = ClassifierHead(d_model, num_classes)

    def fuse(self, tokens, masks):
        batch_size = tokens[self.modalities[0]].shape[0]
        pivots = self.pivots.expand(batch_size, -1, -1)
        pivot_mask = masks[self.modalities[0]].new_ones(batch_size, self.num_pivots)
        for unimodal, readers, gate in zip(self.unimodal_layers, self.pivot_layers,
                                           self.gates):
            for name in self.modalities:
                tokens[name] = unimodal[name](tokens[name], masks[name])
            readings = torch.stack(
                [readers[name](pivots, pivot_mask, tokens[name], masks[name])
                 for name in self.modalities],
                dim=1,
            )  # (B, M, P, D)
            class_tokens = torch.cat([tokens[name][:, 0] for name in self.modalities], dim=-1)
            weights = torch.softmax(gate(class_tokens), dim=-1)  # (B, M)
            pivots = (weights[:, :, None, None] * readings).sum(dim=1)
        return tokens, pivots.mean(dim=1)

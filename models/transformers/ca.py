"""CA: co-attention transformer.

At every layer each modality attends to the tokens of all the other modalities
(concatenated, with their masks concatenated the same way); all modalities update
from the previous layer's states. The fusion head reads the concatenated class
tokens.
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import ClassifierHead, CrossAttentionLayer


class CA(MidFusionTransformer):
    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        # num_bottleneck is accepted so every model type shares one signature; CA
        # exchanges tokens directly and has no bottleneck.
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {name: CrossAttentionLayer(**self.layer_kwargs()) for name in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.fusion_head = ClassifierHead(len(self.modalities) * d_model, num_classes)

    def _others(self, values, name):
        return torch.cat([values[other] for other in self.modalities if other != name], dim=1)

    def fuse(self, tokens, masks):
        for layer in self.layers:
            tokens = {
                name: layer[name](tokens[name], masks[name],
                                  self._others(tokens, name), self._others(masks, name))
                for name in self.modalities
            }
        fused = torch.cat([tokens[name][:, 0] for name in self.modalities], dim=-1)
        return tokens, fused

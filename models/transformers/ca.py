"""CA: co-attention transformer.

Every layer is decoder-style for each modality: its tokens first attend among themselves
(self-attention within the modality), then to the tokens of all the other modalities
(concatenated, masks concatenated the same way), then a feed-forward step. All modalities
update from the previous layer's states, so the result does not depend on the order the
modalities are listed in (the released two-modality model updates visual first and lets
audio read the updated visual). The fusion head reads the concatenated class tokens.

A modality's class token reads its own modality before the others at every layer, so its
head leans on its own input, but it is not unimodal: unimodal baselines are refused.
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import ClassifierHead, DecoderLayer


class CA(MidFusionTransformer):
    HEAD_INPUT = "its own modality first, then the others (co-attention)"

    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        # num_bottleneck is accepted so every model type shares one signature; CA
        # exchanges tokens directly and has no bottleneck.
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {name: DecoderLayer(**self.layer_kwargs()) for name in self.modalities}
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

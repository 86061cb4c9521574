"""MBT: multimodal bottleneck transformer.

Modalities exchange information only through a few shared bottleneck tokens: at
every layer each modality's encoder sees [its own tokens; the bottleneck], and the
next bottleneck is the mean of what the modalities wrote into it. Feed-forward
8/3 x d_model as released (2048 at 768).
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import (
    ClassifierHead,
    SelfAttentionLayer,
    learned_tokens,
)


class MBT(MidFusionTransformer):
    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.num_bottleneck = num_bottleneck
        self.bottleneck = learned_tokens(num_bottleneck, d_model)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {name: SelfAttentionLayer(**self.layer_kwargs()) for name in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.fusion_head = ClassifierHead(d_model, num_classes)

    def fuse(self, tokens, masks):
        batch_size = tokens[self.modalities[0]].shape[0]
        bottleneck = self.bottleneck.expand(batch_size, -1, -1)
        bottleneck_mask = masks[self.modalities[0]].new_ones(batch_size, self.num_bottleneck)
        for layer in self.layers:
            written = []
            for name in self.modalities:
                length = tokens[name].shape[1]
                joint = layer[name](
                    torch.cat([tokens[name], bottleneck], dim=1),
                    torch.cat([masks[name], bottleneck_mask], dim=1),
                )
                tokens[name] = joint[:, :length]
                written.append(joint[:, length:])
            bottleneck = torch.stack(written, dim=0).mean(dim=0)
        # Bottleneck tokens are never padding, so a plain mean is the masked mean.
        return tokens, bottleneck.mean(dim=1)

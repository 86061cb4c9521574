"""UMT: unified multimodal transformer with two-way pivot exchange.

At every layer the pivot tokens first collect from each modality (a decoder-style
layer per modality: pivots attend among themselves, then to that modality; the
per-modality collections are averaged), then each modality propagates the updated
pivots into its tokens (a decoder-style layer: self-attention within the modality,
then attention to the pivots). As released, four decoder layers per fusion layer for
two modalities, feed-forward 8/3 x d_model (2048 at 768).
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import (
    ClassifierHead,
    DecoderLayer,
    learned_tokens,
)


def _per_modality(modalities, layer_factory, num_layers):
    return nn.ModuleList(
        nn.ModuleDict({name: layer_factory() for name in modalities})
        for _ in range(num_layers)
    )


class UMT(MidFusionTransformer):
    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.num_pivots = num_bottleneck
        self.pivots = learned_tokens(num_bottleneck, d_model)
        kwargs = self.layer_kwargs()
        self.collect_layers = _per_modality(
            self.modalities, lambda: DecoderLayer(**kwargs), num_layers)
        self.propagate_layers = _per_modality(
            self.modalities, lambda: DecoderLayer(**kwargs), num_layers)
        self.fusion_head = ClassifierHead(d_model, num_classes)

    def fuse(self, tokens, masks):
        batch_size = tokens[self.modalities[0]].shape[0]
        pivots = self.pivots.expand(batch_size, -1, -1)
        pivot_mask = masks[self.modalities[0]].new_ones(batch_size, self.num_pivots)
        for collect, propagate in zip(self.collect_layers, self.propagate_layers):
            pivots = torch.stack(
                [collect[name](pivots, pivot_mask, tokens[name], masks[name])
                 for name in self.modalities],
                dim=0,
            ).mean(dim=0)
            for name in self.modalities:
                tokens[name] = propagate[name](tokens[name], masks[name], pivots, pivot_mask)
        return tokens, pivots.mean(dim=1)

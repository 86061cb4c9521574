"""EMT: efficient multimodal transformer (intermediate representation fusion).

Each modality keeps its own self-attention stack. Alongside, a small set of pivot tokens
is refined at every layer by a gated fusion block: the pivots attend among themselves,
read each modality (pivots as queries), each reading is scaled by a gate computed from the
modalities' class tokens, the gated readings are averaged and pass a feed-forward step.
The pivots never write back, so each unimodal head sees only its own modality.

Feed-forward width as released: 4/3 x d_model (1024 at d_model 768).
"""

import torch
from torch import nn

from models.transformers.base import MidFusionTransformer
from models.transformers.blocks import (
    ClassifierHead,
    FeedForward,
    MultiHeadAttention,
    SelfAttentionLayer,
    learned_tokens,
)


class GatedPivotFusion(nn.Module):
    """One EMT fusion step over the pivots; reads the modality tokens, never changes them."""

    def __init__(self, modalities, d_model, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.modalities = tuple(modalities)
        self.pivot_norm = nn.LayerNorm(d_model)
        self.self_attention = MultiHeadAttention(d_model, num_heads, dropout)
        self.query_norms = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in self.modalities})
        self.context_norms = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in self.modalities})
        self.readers = nn.ModuleDict(
            {m: MultiHeadAttention(d_model, num_heads, dropout) for m in self.modalities})
        # A modality's gate sees its own class token first, then the others'.
        self.gates = nn.ModuleDict(
            {m: nn.Linear(len(self.modalities) * d_model, d_model) for m in self.modalities})
        self.feedforward_norm = nn.LayerNorm(d_model)
        self.feedforward = FeedForward(d_model, dim_feedforward, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, pivots, pivot_mask, tokens, masks):
        normed = self.pivot_norm(pivots)
        pivots = pivots + self.residual_dropout(self.self_attention(normed, normed, pivot_mask))
        gated = []
        for name in self.modalities:
            reading = pivots + self.residual_dropout(self.readers[name](
                self.query_norms[name](pivots), self.context_norms[name](tokens[name]), masks[name]))
            order = (name,) + tuple(m for m in self.modalities if m != name)
            gate = torch.sigmoid(self.gates[name](torch.cat([tokens[m][:, 0] for m in order], dim=-1)))
            gated.append(reading * (1.0 + gate[:, None, :]))
        # A mean, not a sum, so the pivots keep their scale whatever the number of modalities.
        mixed = torch.stack(gated, dim=0).mean(dim=0)
        return mixed + self.residual_dropout(self.feedforward(self.feedforward_norm(mixed)))


class EMT(MidFusionTransformer):
    FEEDFORWARD_RATIO = 4 / 3
    UNIMODAL_HEADS = True
    HEAD_INPUT = "its own modality only"

    def __init__(self, modalities, input_dims, num_classes, d_model=768, num_layers=3,
                 num_heads=8, num_bottleneck=12, dropout=0.1, dim_feedforward=None):
        super().__init__(modalities, input_dims, num_classes, d_model, num_layers,
                         num_heads, dropout, dim_feedforward)
        self.num_pivots = num_bottleneck
        self.pivots = learned_tokens(num_bottleneck, d_model)
        self.unimodal_layers = nn.ModuleList(
            nn.ModuleDict(
                {name: SelfAttentionLayer(**self.layer_kwargs()) for name in self.modalities}
            )
            for _ in range(num_layers)
        )
        self.fusion_layers = nn.ModuleList(
            GatedPivotFusion(self.modalities, **self.layer_kwargs()) for _ in range(num_layers))
        self.fusion_head = ClassifierHead(d_model, num_classes)

    def fuse(self, tokens, masks):
        batch_size = tokens[self.modalities[0]].shape[0]
        pivots = self.pivots.expand(batch_size, -1, -1)
        pivot_mask = masks[self.modalities[0]].new_ones(batch_size, self.num_pivots)
        for unimodal, fusion in zip(self.unimodal_layers, self.fusion_layers):
            for name in self.modalities:
                tokens[name] = unimodal[name](tokens[name], masks[name])
            pivots = fusion(pivots, pivot_mask, tokens, masks)
        return tokens, pivots.mean(dim=1)

"""Building blocks shared by the mid-fusion transformers (EMT, MBT, UMT, CA).

Conventions used throughout:
- every sequence is batch-first, (B, T, d_model);
- a mask is a bool tensor (B, T) with True for a real token and False for padding;
- padded rows are forced to exactly zero after every block, so whatever values a
  caller puts in padded steps (even huge ones) can never leak into real tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def build_token_mask(step_mask, num_prefix=1):
    """Extend a (B, T) step mask with `num_prefix` leading True columns.

    The class token is prepended to every stream, so the mask handed to attention
    must carry a True at that position for the two to stay aligned.
    """
    prefix = step_mask.new_ones(step_mask.shape[0], num_prefix)
    return torch.cat([prefix, step_mask], dim=1)


def zero_padding(tokens, mask):
    # torch.where rather than a multiply: inf * 0 would give NaN.
    return torch.where(mask.unsqueeze(-1), tokens, torch.zeros_like(tokens))


def masked_mean(tokens, mask):
    """Mean over the real tokens of each sequence; (B, T, D), (B, T) -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    total = zero_padding(tokens, mask).sum(dim=1)
    # Every stream carries a real class token, but clamp so a caller's all-False
    # mask gives zeros instead of NaN.
    return total / weights.sum(dim=1).clamp(min=1.0)


def sinusoidal_positions(length, dim, device, dtype):
    """Fixed sine/cosine encodings for positions 0..length-1, any length."""
    positions = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32)
        * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(positions * frequencies)
    table[:, 1::2] = torch.cos(positions * frequencies[: dim // 2])
    return table.to(dtype)


class InputEmbedding(nn.Module):
    """Linear projection to d_model, a learned class token, sinusoidal positions.

    Returns (tokens, token_mask) of length T + 1; index 0 is the class token.
    """

    def __init__(self, input_dim, d_model, dropout):
        super().__init__()
        self.input_dim = input_dim
        self.projection = nn.Linear(input_dim, d_model)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, steps, step_mask):
        # Zero padded inputs before the projection so huge padding values never
        # overflow inside the Linear.
        steps = zero_padding(steps, step_mask)
        projected = self.projection(steps)
        batch_size = projected.shape[0]
        class_tokens = self.class_token.expand(batch_size, -1, -1)
        tokens = torch.cat([class_tokens, projected], dim=1)
        tokens = tokens + sinusoidal_positions(
            tokens.shape[1], tokens.shape[2], tokens.device, tokens.dtype
        )
        token_mask = build_token_mask(step_mask)
        return zero_padding(self.dropout(tokens), token_mask), token_mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a key mask, written out so no eval fast path
    (nested tensors, fused kernels with their own padding rules) changes results."""

    def __init__(self, d_model, num_heads, dropout):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads})."
            )
        self.num_heads = num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.output = nn.Linear(d_model, d_model)
        self.attention_dropout = dropout

    def _split_heads(self, x):
        batch_size, length, width = x.shape
        head_dim = width // self.num_heads
        return x.view(batch_size, length, self.num_heads, head_dim).transpose(1, 2)

    def forward(self, queries, context, context_mask):
        query = self._split_heads(self.query(queries))
        key, value = self.key_value(context).chunk(2, dim=-1)
        key, value = self._split_heads(key), self._split_heads(value)
        # (B, 1, 1, T_k): the same key mask for every head and every query row.
        allowed = context_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=allowed,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        batch_size, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch_size, length, -1)
        return self.output(attended)


class FeedForward(nn.Module):
    def __init__(self, d_model, dim_feedforward, dropout):
        super().__init__()
        self.expand = nn.Linear(d_model, dim_feedforward)
        self.contract = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.contract(self.dropout(F.gelu(self.expand(x))))


class CrossAttentionLayer(nn.Module):
    """Pre-norm block: queries attend to a context, then a feed-forward step.

    Residual on the queries. Padded query rows are zeroed on the way out.
    """

    def __init__(self, d_model, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.query_norm = nn.LayerNorm(d_model)
        self.context_norm = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, num_heads, dropout)
        self.feedforward_norm = nn.LayerNorm(d_model)
        self.feedforward = FeedForward(d_model, dim_feedforward, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, queries, query_mask, context, context_mask):
        attended = self.attention(
            self.query_norm(queries), self.context_norm(context), context_mask
        )
        queries = queries + self.residual_dropout(attended)
        queries = queries + self.residual_dropout(
            self.feedforward(self.feedforward_norm(queries))
        )
        return zero_padding(queries, query_mask)


class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer encoder layer over one masked sequence."""

    def __init__(self, d_model, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = MultiHeadAttention(d_model, num_heads, dropout)
        self.feedforward_norm = nn.LayerNorm(d_model)
        self.feedforward = FeedForward(d_model, dim_feedforward, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, tokens, mask):
        normed = self.attention_norm(tokens)
        tokens = tokens + self.residual_dropout(self.attention(normed, normed, mask))
        tokens = tokens + self.residual_dropout(
            self.feedforward(self.feedforward_norm(tokens))
        )
        return zero_padding(tokens, mask)


class DecoderLayer(nn.Module):
    """Pre-norm decoder-style block: the queries attend among themselves (their own stream),
    then to a context (another stream), then a feed-forward step; residual after each.

    This is the layer the released CA and UMT stack: a stream first reads itself, so a
    class token keeps its own modality's evidence before it mixes in the others'.
    """

    def __init__(self, d_model, num_heads, dim_feedforward, dropout):
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attention = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross = CrossAttentionLayer(d_model, num_heads, dim_feedforward, dropout)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, queries, query_mask, context, context_mask):
        normed = self.self_norm(queries)
        queries = queries + self.residual_dropout(self.self_attention(normed, normed, query_mask))
        return self.cross(zero_padding(queries, query_mask), query_mask, context, context_mask)


class ClassifierHead(nn.Module):
    """LayerNorm then Linear: the pre-norm stack leaves its outputs un-normalised."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features):
        return self.linear(self.norm(features))


def learned_tokens(count, d_model):
    """Shared learned tokens (bottleneck or pivot), shape (1, count, d_model)."""
    if count < 1:
        raise ValueError(f"num_bottleneck must be at least 1, got {count}.")
    tokens = nn.Parameter(torch.zeros(1, count, d_model))
    nn.init.trunc_normal_(tokens, std=0.02)
    return tokens

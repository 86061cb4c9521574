"""Sizes of the released OLM-Trans models (github anonymous-gitlab/OLM, models/*.py), as
built by its main_trans_logits_com.py: in_chans 1024, d_model 768, 8 heads, 3 layers, 12
pivot/bottleneck tokens, 6 classes, audio + visual.

Parameter counts were obtained by re-stating each released model's layers (PyTorch
MultiheadAttention, Linear and LayerNorm modules of the released sizes) and counting:
- EMT: per modality 3 encoder layers with feed-forward 1024; 3 fusion blocks of 3
  attentions (one declared but unused in its forward), feed-forward 1024, two 2d->d gates
  and 5 LayerNorms;
- MBT: per modality 3 encoder layers, feed-forward 2048 (the layer's default: the model's
  dim_feedforward argument is not passed on);
- UMT: 4 decoder layers per fusion layer (collect and propagate, per modality), 2048;
- CA: per modality 3 decoder layers (self-attention, cross-attention), 2048;
plus two input projections 1024->768, the pivot/bottleneck tokens, two class tokens, one
LayerNorm and three 768->6 heads.
"""

RELEASED_SETUP = dict(input_dim=1024, d_model=768, num_heads=8, num_layers=3, num_bottleneck=12,
                      num_classes=6, modalities=("audio", "visual"))

RELEASED_PARAMETERS = {"emt": 58_331_922, "mbt": 34_684_434, "umt": 96_135_186, "ca": 48_867_858}
RELEASED_FEEDFORWARD = {"emt": 1024, "mbt": 2048, "umt": 2048, "ca": 2048}

"""One entry point that builds any of the mid-fusion transformers by name."""

from models.transformers.ca import CA
from models.transformers.emt import EMT
from models.transformers.mbt import MBT
from models.transformers.umt import UMT

TRANSFORMER_TYPES = {"emt": EMT, "mbt": MBT, "umt": UMT, "ca": CA}


def build_transformer(model_type, modalities, input_dims, num_classes, d_model=768,
                      num_layers=3, num_heads=8, num_bottleneck=12, dropout=0.1,
                      dim_feedforward=None, predict_valence=False):
    """Build a mid-fusion transformer returning dict head -> (B, num_classes) logits.

    model_type: one of "emt", "mbt", "umt", "ca" (case-insensitive).
    input_dims: one int for all modalities, a sequence in modality order, or a dict.
    num_bottleneck: bottleneck tokens for MBT, pivot tokens for EMT/UMT; unused by CA.
    predict_valence: add a valence regressor on the fused features (output key "valence").
    dim_feedforward: hidden width of the feed-forward blocks; None (or 0) means the released
        model's width scaled to d_model (EMT 4/3 x d_model, the others 8/3 x d_model).
    """
    key = str(model_type).lower()
    if key not in TRANSFORMER_TYPES:
        raise ValueError(
            f"unknown transformer model_type {model_type!r}; "
            f"choose one of {', '.join(TRANSFORMER_TYPES)}."
        )
    model = TRANSFORMER_TYPES[key](
        modalities,
        input_dims,
        num_classes,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_bottleneck=num_bottleneck,
        dropout=dropout,
        dim_feedforward=dim_feedforward,
    )
    return model.enable_valence() if predict_valence else model

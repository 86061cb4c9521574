"""The mid-fusion transformers beside the released ones: parameter counts, feed-forward widths,
what each unimodal head reads, and how much each head's logits depend on its own input.

Built at the released sizes (1024-d audio and visual features, d_model 768, 3 layers, 8
heads, 12 pivots, 6 classes). The dependence is the gradient norm of a head's summed logits
with respect to its own modality's input over that with respect to the other's, on random
inputs at initialisation (eval mode), for several seeds: above 1, the head leans on its own
modality; infinite, it reads nothing else. Example:

    OMP_NUM_THREADS=1 python -m benchmarks.trans_model_table --report docs/results/trans-models.md
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations per model")
    parser.add_argument("--steps", type=int, default=16, help="sequence length of the random inputs")
    parser.add_argument("--report", help="also write the table to this markdown file "
                                         "(e.g. docs/results/trans-models.md)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be at least 1")
    return args


def fmt_ratio(values) -> str:
    if all(math.isinf(v) for v in values):
        return "only its own (others 0)"
    return f"{min(values):.2f} / {sum(values) / len(values):.2f}"


def measure(args) -> list[dict]:
    import torch
    from tqdm import tqdm

    from models.transformers.build import TRANSFORMER_TYPES, build_transformer
    from models.transformers.head_dependence import input_gradient_norms, own_over_other, random_inputs
    from models.transformers.released import RELEASED_FEEDFORWARD, RELEASED_PARAMETERS, RELEASED_SETUP

    setup = RELEASED_SETUP
    rows = []
    for model_type in tqdm(TRANSFORMER_TYPES, desc="models", unit="model"):
        ratios = {m: [] for m in setup["modalities"]}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_transformer(model_type, setup["modalities"], setup["input_dim"], setup["num_classes"],
                                      d_model=setup["d_model"], num_layers=setup["num_layers"],
                                      num_heads=setup["num_heads"], num_bottleneck=setup["num_bottleneck"])
            for head, ratio in own_over_other(input_gradient_norms(
                    model, random_inputs(model, batch_size=2, steps=args.steps, seed=seed))).items():
                ratios[head].append(ratio)
        rows.append({"model": model_type, "ours": sum(p.numel() for p in model.parameters()),
                     "released": RELEASED_PARAMETERS[model_type], "ff": model.dim_feedforward,
                     "released_ff": RELEASED_FEEDFORWARD[model_type], "reads": model.HEAD_INPUT,
                     "unimodal": model.UNIMODAL_HEADS, "ratios": ratios})
    return rows


def table(rows: list[dict], args) -> str:
    heads = list(rows[0]["ratios"])
    lines = ["| model | parameters (ours) | released | difference | feed-forward (ours / released) | "
             "a unimodal head reads | audio_only / visual_only | "
             + " | ".join(f"{h} head: own/other gradient, min / mean" for h in heads) + " |",
             "|---" * (7 + len(heads)) + "|"]
    for row in rows:
        diff = 100 * (row["ours"] - row["released"]) / row["released"]
        lines.append(f"| {row['model']} | {row['ours'] / 1e6:.2f}M | {row['released'] / 1e6:.2f}M | {diff:+.2f}% | "
                     f"{row['ff']} / {row['released_ff']} | {row['reads']} | "
                     f"{'allowed' if row['unimodal'] else 'refused'} | "
                     + " | ".join(fmt_ratio(row["ratios"][h]) for h in heads) + " |")
    lines += ["", f"Released sizes, audio + visual; gradients on random inputs of {args.steps} steps (batch 2, "
              f"ragged lengths) at initialisation, {args.seeds} seeds."]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    body = table(measure(args), args)
    print(body)
    if args.report:
        from utils.provenance import write_report

        import shlex

        command = "python -m benchmarks.trans_model_table " + shlex.join(sys.argv[1:])
        print(f"report: {write_report(args.report, body, command=command)}")


if __name__ == "__main__":
    main()

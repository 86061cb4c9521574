"""The short table printed at the end of a run."""
from __future__ import annotations


def summary_table(results: dict) -> str:
    heads = list(results["test"])
    lines = [f"{results['dataset']} / {results['method']}: best epoch {results['best_epoch']} "
             f"of {results['epochs']} (picked on val {results['selection_head']} accuracy), "
             f"{results['seconds']:.0f} s",
             f"{'head':<10}{'val acc':>9}{'test acc':>10}{'test F1':>9}{'coef':>8}"]
    for head in heads:
        coefficient = results.get("coefficients", {}).get(head, float("nan"))
        lines.append(f"{head:<10}{results['val'][head]['acc']:>9.3f}{results['test'][head]['acc']:>10.3f}"
                     f"{results['test'][head]['f1']:>9.3f}{coefficient:>8.3f}")
    return "\n".join(lines)

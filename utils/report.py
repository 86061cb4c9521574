"""The short table printed at the end of a run: each head's accuracy and coefficient, and for
OLM's rate target the regime it trained in (mean target ratio, share of saturated steps)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def regime_rows(rows: list[dict]) -> list[dict]:
    """The epochs whose OLM diagnostics describe the regime: after the first (by default the
    reference epoch, where the ratios are uniform by construction) when there are several."""
    logged = [r for r in rows if (r.get("olm") or {}).get("ratios")]
    return logged[1:] if len(logged) > 1 else logged


def regime(rows: list[dict], heads: list[str]) -> dict | None:
    """Per head: mean target ratio and share of steps saturated on that head; plus the total
    saturated share and the epochs averaged. ``None`` when no ratios were logged."""
    chosen = regime_rows(rows)
    if not chosen:
        return None

    def mean_of(key, head):
        values = [r["olm"][key][head] for r in chosen if head in (r["olm"].get(key) or {})]
        return statistics.fmean(values) if values else math.nan

    saturated = [r["olm"]["saturated"] for r in chosen if "saturated" in r["olm"]]
    return {"epochs": [r["epoch"] for r in chosen],
            "ratio": {h: mean_of("ratios", h) for h in heads},
            "saturated_head": {h: mean_of("saturated_head", h) for h in heads},
            "saturated": statistics.fmean(saturated) if saturated else math.nan}


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line only costs the regime columns
    return rows


def epochs_label(epochs: list[int]) -> str:
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"


def summary_table(results: dict, rows: list[dict] | None = None) -> str:
    """``rows``: the run's metrics.jsonl rows (read from ``results['run_dir']`` when omitted)."""
    heads = list(results["test"])
    rows = read_metrics(results.get("run_dir")) if rows is None else rows
    olm = regime(rows, heads)
    lines = [f"{results['dataset']} / {results['method']}: best epoch {results['best_epoch']} "
             f"of {results['epochs']} (picked on val {results['selection_head']} accuracy), "
             f"{results['seconds']:.0f} s"]
    imbalance = results.get("imbalance") or {}
    probes = imbalance.get("probe") or {}
    reliance = ((imbalance.get("reliance") or {}).get("test") or {})
    shapley = ((imbalance.get("shapley") or {}).get("test") or {}).get("values", {})
    width = max([10] + [len(f"probe {m}") + 1 for m in probes])
    header = f"{'head':<{width}}{'val acc':>9}{'test acc':>10}{'test F1':>9}{'coef':>8}"
    if olm:
        header += f"{'ratio':>8}{'saturated':>11}"
    if reliance:
        header += f"{'reliance':>10}{'Shapley':>9}"
    lines.append(header)
    for head in heads:
        coefficient = results.get("coefficients", {}).get(head, float("nan"))
        line = (f"{head:<{width}}{results['val'][head]['acc']:>9.3f}{results['test'][head]['acc']:>10.3f}"
                f"{results['test'][head]['f1']:>9.3f}{coefficient:>8.3f}")
        if olm:
            share = olm["saturated_head"][head]
            line += f"{olm['ratio'][head]:>8.3f}" + (f"{100 * share:>10.0f}%" if not math.isnan(share) else f"{'—':>11}")
        if reliance:
            line += (f"{reliance[head]['drop']:>10.3f}{shapley.get(head, math.nan):>9.3f}" if head in reliance
                     else f"{'—':>10}{'—':>9}")
        lines.append(line)
    for m, probe in probes.items():
        lines.append(f"{'probe ' + m:<{width}}{probe['val']['acc']:>9.3f}{probe['test']['acc']:>10.3f}"
                     f"{probe['test']['f1']:>9.3f}{'—':>8}")
    if olm:
        total = olm["saturated"]
        lines.append(f"ratio: mean OLM target ratio; saturated: share of steps whose target put all the mass "
                     f"on that head ({'' if math.isnan(total) else f'{100 * total:.0f}% of steps in all, '}"
                     f"{epochs_label(olm['epochs'])})")
    if probes:
        lines.append("probe: linear probe of the best checkpoint's frozen encoder (fitted on train, l2 picked on val)"
                     + ("; reliance: drop in fusion test acc when that modality's features come from other "
                        "samples; Shapley: its share of fusion test acc over modality subsets" if reliance else ""))
    return "\n".join(lines)

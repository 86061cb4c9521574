"""The method a run's config asks for, built from the methods package (``olmbalance``).

The loop and the trainer know a method only through its hooks (``olmbalance.base.Method``);
this is the one place where a run's options become a method's settings and context.
"""
from __future__ import annotations

import math
from typing import Sequence

from olmbalance import Method, RunContext, build_method, method_entry


def method_from_config(cfg, heads: Sequence[str], train_size: int) -> Method:
    """The method ``cfg.method`` with its own settings (``cfg.method_settings``, prefixed keys
    such as ``pmr_alpha``) and the run's context; OLM's reference spans one epoch unless
    ``--reference-steps`` says otherwise."""
    entry = method_entry(cfg.method)
    steps_per_epoch = math.ceil(train_size / cfg.batch_size)
    reference_steps = cfg.reference_steps or steps_per_epoch
    # --reference-tail is a share of the window: its last ceil(share * steps) steps make L0.
    reference_tail = max(1, math.ceil(getattr(cfg, "reference_tail", 1.0) * reference_steps))
    context = RunContext(steps_per_epoch=steps_per_epoch, seed=cfg.seed, reference_steps=reference_steps,
                         reference_tail=reference_tail, target_scale=cfg.target_scale,
                         optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         loss_reduction=cfg.loss_reduction, epochs=cfg.epochs)
    saved = getattr(cfg, "method_settings", None) or {}
    settings = {setting.name: saved[key] for key, setting in entry.keys().items() if key in saved}
    return build_method(cfg.method, heads, settings, context)


def methods_table() -> str:
    """Markdown: every registered method, its flags with their defaults, and its authors' recipe."""
    import olmbalance

    def recipe_text(values: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in values.items()) or "—"

    lines = ["| method | what it is | settings (flag: default) | without `--recipe` | authors' recipe (`--recipe authors`) |",
             "|---|---|---|---|---|"]
    for name, entry in olmbalance.METHODS.items():
        settings = "; ".join(f"`{entry.flag(s)}`: {s.default}" for s in entry.settings) or "—"
        recipes = ["; ".join(f"{dataset if dataset != '*' else 'all'}: {recipe_text(values)}"
                             for dataset, values in entry.recipes.get(choice, {}).items()) or "the dataset's"
                   for choice in ("default", "authors")]
        lines.append(f"| `{name}` | {entry.summary} | {settings} | {recipes[0]} | {recipes[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Print (or write) the table of registered methods, "
                                     "their settings and their authors' recipes.")
    parser.add_argument("--report", help="write the table to this markdown file (e.g. docs/results/methods.md)")
    args = parser.parse_args(argv)
    table = methods_table()
    if args.report:
        from utils.provenance import write_report

        write_report(args.report, "Registered methods, read from the registry (olmbalance).\n\n" + table)
    print(table, end="")


if __name__ == "__main__":
    main()


def model_and_method(cfg, classes: int, modalities: Sequence[str], train_size: int, device):
    """The late-fusion model and the run's method, as a run trains them: the method's ``setup``
    first, because it may add parts to the model (Greedy's MMTM blocks, AMCo's output layer)
    that must then move, take the memory format and be compiled with the rest."""
    import torch

    from models.encoders import late_fusion_model
    from utils.device import channels_last, compile_model

    model = late_fusion_model(cfg, classes, modalities)
    method = method_from_config(cfg, model.heads, train_size)
    method.setup(model)
    model, method = model.to(device), method.to(device)
    if channels_last(cfg, device):  # default: on with CUDA, off on the CPU
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_model(model)
    return model, method

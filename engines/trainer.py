"""Epoch orchestration shared by every entry point: optimizers, loaders, checkpoints, best-epoch
selection on validation, and ``results.json`` (test reported at the best-on-val epoch)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from config import Config
from engines.engines_logits_com import NonFiniteLoss, StepContext, cycle, evaluate, train_one_epoch
from engines.methods import Method
from utils import distributed
from utils.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_atomic
from utils.errors import UserError
from utils.run_logging import RunLogger, write_json
from utils.seed import loader_generator, seed_worker

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    heldout: DataLoader | None
    generators: dict[str, torch.Generator]


def make_loaders(cfg: Config, data, device: torch.device, need_heldout: bool) -> Loaders:
    from utils.distributed_data import sharded_sampler

    pin = device.type == "cuda"
    common = dict(num_workers=cfg.workers, pin_memory=pin, collate_fn=data.collate_fn,
                  worker_init_fn=seed_worker, persistent_workers=cfg.workers > 0)
    generators = {"train": loader_generator(cfg.seed), "heldout": loader_generator(cfg.seed + 1)}
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size

    def loader(dataset, batch_size, shuffle, generator=None):
        sampler = sharded_sampler(dataset, shuffle, cfg.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, generator=generator, **common)

    heldout = None
    if need_heldout:
        heldout = loader(data.val, min(cfg.heldout_batch_size, len(data.val)), True, generators["heldout"])
    return Loaders(train=loader(data.train, cfg.batch_size, True, generators["train"]),
                   val=loader(data.val, eval_batch, False), test=loader(data.test, eval_batch, False),
                   heldout=heldout, generators=generators)


def set_epoch(loaders: Loaders, epoch: int) -> None:
    for loader in (loaders.train, loaders.heldout):
        if loader is not None and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)


def make_context(cfg: Config, model: nn.Module, method: Method, device: torch.device) -> StepContext:
    network = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    coefficients = method.coefficient_parameters()
    coefficient_optimizer = (torch.optim.Adam(coefficients, lr=cfg.coef_lr, weight_decay=cfg.coef_weight_decay)
                             if coefficients else None)
    amp_dtype = AMP_DTYPES[cfg.amp] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return StepContext(device=device, network_optimizer=network, coefficient_optimizer=coefficient_optimizer,
                       scaler=scaler, amp_dtype=amp_dtype, channels_last=cfg.channels_last,
                       heldout_every=max(1, cfg.heldout_every), progress=cfg.progress)


def checkpoint_payload(cfg, model, method, ctx, scheduler, loaders, epoch, best) -> dict:
    unwrapped = getattr(model, "module", model)
    optimizers = {"network": ctx.network_optimizer.state_dict()}
    if ctx.coefficient_optimizer is not None:
        optimizers["coefficients"] = ctx.coefficient_optimizer.state_dict()
    return {
        "model": unwrapped.state_dict(), "method": method.state_dict(), "optimizers": optimizers,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
        "epoch": epoch, "step": ctx.step, "best": best, "config": cfg.to_dict(),
        "rng": rng_state(), "loader_rng": {k: g.get_state() for k, g in loaders.generators.items()},
    }


def restore(payload, model, method, ctx, scheduler, loaders) -> tuple[int, dict]:
    getattr(model, "module", model).load_state_dict(payload["model"])
    method.load_state_dict(payload["method"])
    ctx.network_optimizer.load_state_dict(payload["optimizers"]["network"])
    if ctx.coefficient_optimizer is not None:
        ctx.coefficient_optimizer.load_state_dict(payload["optimizers"]["coefficients"])
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
    if ctx.scaler is not None and payload.get("scaler"):
        ctx.scaler.load_state_dict(payload["scaler"])
    ctx.step = payload["step"]
    restore_rng_state(payload["rng"])
    for key, state in payload.get("loader_rng", {}).items():
        loaders.generators[key].set_state(state)
    return payload["epoch"], payload["best"]


def resume_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint found (expected a run folder with last.pt or a .pt file)")
    return path


def fit(cfg: Config, model: nn.Module, method: Method, loaders: Loaders, run_dir: Path,
        device: torch.device, extra_results: dict | None = None) -> dict:
    """Train ``cfg.epochs`` epochs; pick the best epoch on validation; return the results."""
    main = distributed.is_main()
    ctx = make_context(cfg, model, method, device)
    scheduler = (torch.optim.lr_scheduler.StepLR(ctx.network_optimizer, cfg.lr_step, cfg.lr_gamma)
                 if cfg.lr_step > 0 else None)
    logger = RunLogger(run_dir, enabled=main)
    heads = method.heads
    selection = method.selection_head()
    start_epoch, best = 1, {"epoch": 0, "val_acc": -1.0}
    if cfg.resume:
        done, best = restore(load_checkpoint(resume_path(cfg.resume)), model, method, ctx, scheduler, loaders)
        start_epoch = done + 1
        logger.truncate_after(done)
    began = time.time() - best.get("seconds", 0.0)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            epoch_began = time.time()
            set_epoch(loaders, epoch)
            heldout_iter = cycle(loaders.heldout) if loaders.heldout is not None else None
            try:
                train_metrics, diagnostics = train_one_epoch(model, method, loaders.train, heldout_iter, ctx, epoch)
            except NonFiniteLoss as error:
                raise UserError(f"{error}; training stopped, the last good checkpoint is {run_dir / 'last.pt'}") from None
            from utils.distributed_data import reduce_metrics

            train = reduce_metrics(train_metrics)
            val = reduce_metrics(evaluate(model, loaders.val, heads, ctx, f"epoch {epoch} val"))
            test = reduce_metrics(evaluate(model, loaders.test, heads, ctx, f"epoch {epoch} test"))
            if scheduler is not None:
                scheduler.step()
            row = {"epoch": epoch, "lr": ctx.network_optimizer.param_groups[0]["lr"], "step": ctx.step,
                   "train": train, "val": val, "test": test, "coefficients": method.coefficients(),
                   "olm": diagnostics, "skipped_samples": ctx.skipped_samples,
                   "seconds": time.time() - epoch_began}
            logger.log_epoch(row)
            improved = val[selection]["acc"] > best["val_acc"]
            if improved:
                best = {"epoch": epoch, "val_acc": val[selection]["acc"], "val": val, "test": test,
                        "coefficients": method.coefficients()}
            best["seconds"] = time.time() - began
            if main:
                payload = checkpoint_payload(cfg, model, method, ctx, scheduler, loaders, epoch, best)
                save_atomic(payload, run_dir / "last.pt")
                if improved:
                    save_atomic(payload, run_dir / "best.pt")
    finally:
        logger.close()
    if best["epoch"] == 0:
        raise UserError(f"no epoch was trained (--epochs {cfg.epochs}, resumed at {start_epoch})")
    results = build_results(cfg, method, best, time.time() - began, extra_results)
    if main:
        write_json(run_dir / "results.json", results)
    return results


def build_results(cfg: Config, method: Method, best: dict, seconds: float, extra: dict | None) -> dict:
    def pick(split):
        return {h: {"acc": m["acc"], "f1": m["f1"], "loss": m["loss"], "norm": m["norm"]}
                for h, m in best[split].items()}

    results = {"dataset": cfg.dataset, "method": cfg.method, "fusion": cfg.fusion, "seed": cfg.seed,
               "epochs": cfg.epochs, "best_epoch": best["epoch"], "selection_head": method.selection_head(),
               "seconds": round(seconds, 2), "val": pick("val"), "test": pick("test"),
               "coefficients": method.coefficients(), "coefficients_at_best": best["coefficients"]}
    results.update(extra or {})
    return results

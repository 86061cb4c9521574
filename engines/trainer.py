"""Epoch orchestration shared by every entry point: optimizers, loaders, checkpoints, best-epoch
selection on validation, and ``results.json`` (test reported at the best-on-val epoch).

Under torchrun the same code runs in every process: ``fit`` wraps the model in DDP, each rank
trains on its shard of every global batch, and rank 0 alone writes the run folder.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from config import Config
from engines.engines_logits_com import NonFiniteLoss, StepContext, cycle, evaluate, to_device, train_one_epoch
from engines.epoch_data import LoaderEpochData
from olmbalance import Method
from olmbalance.recipes import make_optimizer
from utils import distributed
from utils.checkpoint import (INFERENCE_KIND, load_training_checkpoint, remove_stale_temporaries,
                              restore_rng_state, resume_path, rng_state, save_atomic)
from engines.metrics import reduce_metrics
from utils.distributed_data import ShardedSampler, per_rank_batch
from utils.distributed_setup import wrap_model
from utils.device import channels_last
from utils.errors import UserError
from utils.run_logging import RunLogger, write_json
from utils.seed import loader_generator, seed_worker

log = logging.getLogger(__name__)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Loaders whose order does not matter get a generator of their own, so creating them (which
# draws a worker seed) never consumes the global random stream the training run depends on.
SPARE_SEED_OFFSET = 7919


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    heldout: DataLoader | None
    generators: dict[str, torch.Generator]  # the states a checkpoint must carry


def make_loaders(cfg: Config, data, device: torch.device, need_heldout: bool) -> Loaders:
    """Train, held-out (OLM's, drawn from val), val and test loaders for this process.

    ``--batch-size`` and ``--heldout-batch-size`` are global: each of W processes loads 1/W.
    Worker randomness restarts from the train generator every epoch (fresh workers), which is
    what lets a resumed run redraw exactly what an uninterrupted one would have; loaders that
    do not augment keep persistent workers.
    """
    for split in ("train", "val", "test"):
        if len(getattr(data, split)) == 0:
            raise UserError(f"the {split} split is empty; check --data-root and the split files")
    if cfg.workers > 0:
        # Whatever a dataset imports here, forked workers inherit (rather than each importing
        # it again, every epoch for the training loader).
        for split in ("train", "val", "test"):
            prepare = getattr(getattr(data, split), "prepare_for_workers", None)
            if prepare is not None:
                prepare()
    world = distributed.world_size()
    train_batch = per_rank_batch(cfg.batch_size, "--batch-size")
    generators = {"train": loader_generator(cfg.seed), "heldout": loader_generator(cfg.seed + 1)}
    common = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=data.collate_fn,
                  worker_init_fn=seed_worker)

    def loader(dataset, batch_size, sampler, generator, persistent):
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          persistent_workers=persistent and cfg.workers > 0, **common)

    def spare():
        return loader_generator(cfg.seed + SPARE_SEED_OFFSET)

    eval_batch = max(1, (cfg.eval_batch_size or 2 * cfg.batch_size) // world)
    heldout = None
    if need_heldout:
        # Every held-out batch is full (the loader is cycled, so a short last batch would only
        # add a noisier measurement, or a batch of one that BatchNorm cannot normalize).
        heldout_batch = max(1, min(cfg.heldout_batch_size, len(data.val)) // world)
        heldout = loader(data.val, heldout_batch,
                         ShardedSampler(len(data.val), generators["heldout"], global_batch=heldout_batch * world,
                                        min_last=heldout_batch),
                         spare(), persistent=True)
    # A trailing training batch of one sample per process is left out of the epoch (drawn
    # afresh every epoch); evaluation runs in eval mode, where a batch of one is fine.
    train = loader(data.train, train_batch,
                   ShardedSampler(len(data.train), generators["train"], global_batch=train_batch * world,
                                  min_last=min(2, train_batch)),
                   generators["train"], persistent=False)
    return Loaders(train=train,
                   val=loader(data.val, eval_batch, ShardedSampler(len(data.val), pad=False), spare(), True),
                   test=loader(data.test, eval_batch, ShardedSampler(len(data.test), pad=False), spare(), True),
                   heldout=heldout, generators=generators)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.amp not in AMP_DTYPES:
        raise UserError(f"--amp {cfg.amp!r} is not one of: {', '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is None:
        return None
    if device.type != "cuda":
        if distributed.is_main():
            log.warning("--amp %s applies to CUDA devices only; training on %s in float32", cfg.amp, device)
        return None
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp fp16")
    return dtype


def network_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (released OLM), SGD with momentum (OGM-GE's recipe), both with coupled weight decay,
    or AdamW (BalanceBenchmark's recipe).
    With ``--loss-reduction sum`` the gradient is a sum over the batch, so ``--weight-decay``
    has the strength the released Adam(weight_decay=2e-4) gives it."""
    return make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)


def fp16_scaler(cfg: Config, device_type: str = "cuda") -> torch.amp.GradScaler:
    """GradScaler for fp16. Summed losses make gradients about batch-size times larger than
    means, so the initial scale is divided by the batch: fewer overflowing first steps."""
    init_scale = 2.0 ** 16 / (cfg.batch_size if cfg.loss_reduction == "sum" else 1)
    return torch.amp.GradScaler(device_type, init_scale=init_scale)


def make_context(cfg: Config, model: nn.Module, method: Method, device: torch.device) -> StepContext:
    network = network_optimizer(cfg, model)
    coefficients = method.coefficient_parameters()
    coefficient_optimizer = (torch.optim.Adam(coefficients, lr=cfg.coef_lr, weight_decay=cfg.coef_weight_decay)
                             if coefficients else None)
    dtype = amp_dtype(cfg, device)
    # bf16 keeps float32's exponent range, so only fp16 needs loss scaling.
    scaler = fp16_scaler(cfg, device.type) if dtype == torch.float16 else None
    return StepContext(device=device, network_optimizer=network, coefficient_optimizer=coefficient_optimizer,
                       scaler=scaler, amp_dtype=dtype, channels_last=channels_last(cfg, device),
                       heldout_every=max(1, cfg.heldout_every), heldout_norm=cfg.heldout_norm,
                       loss_reduction=cfg.loss_reduction, progress=cfg.progress)


def checkpoint_payload(cfg, model, method, ctx, scheduler, loaders, epoch, best, skipped) -> dict:
    optimizers = {"network": ctx.network_optimizer.state_dict()}
    if ctx.coefficient_optimizer is not None:
        optimizers["coefficients"] = ctx.coefficient_optimizer.state_dict()
    return {
        "model": distributed.unwrap(model).state_dict(), "method": method.state_dict(),
        "optimizers": optimizers, "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": ctx.scaler.state_dict() if ctx.scaler else None,
        "epoch": epoch, "step": ctx.step, "best": best, "config": cfg.to_dict(),
        "skipped_samples": skipped, "heldout_cache": dict(ctx.heldout_cache),
        "rng": rng_state(), "loader_rng": {k: g.get_state() for k, g in loaders.generators.items()},
    }


def inference_payload(cfg, model, epoch, best, classes=None) -> dict:
    """best.pt: what evaluation and inference need (weights, options, class names, the epoch
    and its metrics), without optimizer state, random states or the method's internals."""
    return {"model": distributed.unwrap(model).state_dict(), "config": cfg.to_dict(), "classes": classes,
            "epoch": epoch, "metrics": {"val": best["val"], "test": best["test"]},
            "coefficients": best["coefficients"], "kind": INFERENCE_KIND}


def restore(payload, model, method, ctx, scheduler, loaders, source: Path) -> tuple[int, dict]:
    """Put every piece of training state back; returns (epochs done, best so far)."""
    try:
        distributed.unwrap(model).load_state_dict(payload["model"])
        method.load_state_dict(payload["method"])
        ctx.network_optimizer.load_state_dict(payload["optimizers"]["network"])
        if ctx.coefficient_optimizer is not None:
            ctx.coefficient_optimizer.load_state_dict(payload["optimizers"]["coefficients"])
    except (RuntimeError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"--resume {source} was saved by another model, method or fusion ({reason}); "
                        "resume with the flags of the run that wrote it") from None
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
    if ctx.scaler is not None and payload.get("scaler"):
        ctx.scaler.load_state_dict(payload["scaler"])
    ctx.step = payload["step"]
    # The saved count is the total over ranks; rank 0 carries it on.
    ctx.skipped_samples = int(payload.get("skipped_samples", 0)) if distributed.is_main() else 0
    ctx.heldout_cache = {h: v.to(ctx.device) for h, v in payload.get("heldout_cache", {}).items()}
    restore_rng_state(payload["rng"])
    for key, state in payload.get("loader_rng", {}).items():
        loaders.generators[key].set_state(state)
    return payload["epoch"], payload["best"]


def stop_message(error: Exception, run_dir: Path, last_epoch: int) -> str:
    kept = (f"the last good checkpoint is {run_dir / 'last.pt'} (epoch {last_epoch})" if last_epoch
            else "no checkpoint had been written yet")
    return f"{error}; training stopped and {kept}; lower --lr or check the inputs"


def fit(cfg: Config, model: nn.Module, method: Method, loaders: Loaders, run_dir: Path,
        device: torch.device, extra_results: dict | None = None) -> dict:
    """Train ``cfg.epochs`` epochs; pick the best epoch on validation; return the results."""
    main = distributed.is_main()
    net = distributed.unwrap(model)
    ctx = make_context(cfg, net, method, device)
    scheduler = (torch.optim.lr_scheduler.StepLR(ctx.network_optimizer, cfg.lr_step, cfg.lr_gamma)
                 if cfg.lr_step > 0 else None)
    heads = method.heads
    selection = method.selection_head()
    done, best = 0, {"epoch": 0, "val_acc": -1.0}
    if cfg.resume:
        source = resume_path(cfg.resume)
        done, best = restore(load_training_checkpoint(source), net, method, ctx, scheduler, loaders, source)
    model = wrap_model(model, device, method)
    logger = RunLogger(run_dir, enabled=main)
    if main:
        remove_stale_temporaries(run_dir)
    if cfg.resume:
        logger.truncate_after(done)
    began = time.time() - best.get("seconds", 0.0)
    try:
        for epoch in range(done + 1, cfg.epochs + 1):
            epoch_began = time.time()
            # Re-created every epoch from the saved generator state, so a resumed run draws
            # the same held-out batches as an uninterrupted one.
            heldout_iter = cycle(loaders.heldout) if loaders.heldout is not None else None
            # Methods that read the data themselves (PMR's prototypes) do it here; never test data.
            method.start_epoch(epoch, net, LoaderEpochData(loaders.train, loaders.val, device, cfg.seed, epoch,
                                                           lambda inputs: to_device(inputs, ctx)))
            net.train()
            try:
                train_metrics, diagnostics = train_one_epoch(model, method, loaders.train, heldout_iter, ctx, epoch)
            except NonFiniteLoss as error:
                raise UserError(stop_message(error, run_dir, epoch - 1)) from None
            distributed.broadcast_buffers(net)
            train = reduce_metrics(train_metrics)
            val = reduce_metrics(evaluate(net, loaders.val, heads, ctx, f"epoch {epoch} val", method))
            test = reduce_metrics(evaluate(net, loaders.test, heads, ctx, f"epoch {epoch} test", method))
            method.end_epoch(epoch, train, val)  # train and val metrics only, never test
            skipped = distributed.all_reduce_sum(ctx.skipped_samples)
            if scheduler is not None:
                scheduler.step()
            row = {"epoch": epoch, "lr": ctx.network_optimizer.param_groups[0]["lr"], "step": ctx.step,
                   "train": train, "val": val, "test": test, "coefficients": method.coefficients(),
                   "olm": diagnostics, "skipped_samples": skipped, "seconds": time.time() - epoch_began}
            logger.log_epoch(row)
            # "val_acc" holds the selection score: accuracy, or --selection-metric's metric.
            score = val[selection][getattr(cfg, "selection_metric", "acc")]
            improved = score > best["val_acc"]
            if improved:
                best = {"epoch": epoch, "val_acc": score, "val": val, "test": test,
                        "coefficients": row["coefficients"]}
            best["seconds"] = time.time() - began
            best["skipped_samples"] = skipped
            if main:
                # best.pt first: a kill between the two writes leaves last.pt one epoch back,
                # and the resumed run redoes that epoch and rewrites both.
                if improved:
                    save_atomic(inference_payload(cfg, model, epoch, best, (extra_results or {}).get("classes")),
                                run_dir / "best.pt")
                save_atomic(checkpoint_payload(cfg, model, method, ctx, scheduler, loaders, epoch, best, skipped),
                            run_dir / "last.pt")
    finally:
        logger.close()
    if best["epoch"] == 0:
        raise UserError(f"no epoch was trained (--epochs {cfg.epochs}, resumed after epoch {done})")
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
               "coefficients": method.coefficients(), "coefficients_at_best": best["coefficients"],
               "skipped_samples": best.get("skipped_samples", 0)}
    results.update(extra or {})
    return results

"""UMT, the uni-modal teacher (Du, Teng, Wang, Zhao, "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023), on top of ``fusion_only``, as BalanceBenchmark
runs it. (Not the UMT transformer of ``models/transformers``.)

No code of the paper's authors was found (searched by title, method and authors); this follows
GeWu-Lab/BalanceBenchmark ``balancemm/trainer/UMT_trainer.py`` (``UMTTrainer.__init__``, which
loads the teachers, and ``UMTTrainer.training_step``), with the settings of
``configs/trainer_config.yaml`` ``UMT`` (scaling 10, modulation epochs 0..80).

The step, inside the modulation epochs (0-based, inclusive): the fusion CE plus, for every
modality m, ``scaling * MSE(t_m(x_m), f_m(x_m))``, where ``f_m`` is the student's encoder
output (the fusion head's input) and ``t_m`` the frozen teacher's encoder output on the same
inputs (no gradient); ``MSE`` is ``nn.MSELoss()``, the mean over batch and feature. Outside
the epochs: the fusion CE alone.

The teachers (one per modality, each an encoder of the model's architecture trained on its
modality alone):

- ``teachers="audio=RUN,visual=RUN"``: the encoders of earlier runs of this project, each RUN
  a run folder (its ``best.pt``, the best-on-validation epoch's weights) or a checkpoint file,
  normally an ``audio_only``/``visual_only`` run of the same model. BalanceBenchmark loads the
  checkpoint of its newest ``unimodalTrainer_<modality>`` run, also the best-on-validation one;
- a modality without one (by default, every modality) gets its teacher trained within the
  run before its first epoch (``start_epoch``), so that ``--method unimodal_teacher`` needs no
  earlier run: a copy of the model's encoder and unimodal head as they start, trained on that
  modality's cross-entropy alone for ``teacher_epochs`` epochs (0: the run's epochs) over the
  training split (``EpochData``), with a fresh optimizer built like the run's (``RunContext``:
  optimizer, learning rate, momentum, weight decay, loss reduction; no learning-rate schedule),
  in float32; after each epoch its accuracy on the validation split is measured and the best
  epoch's encoder is kept (ties: the earlier; without validation data, the last), as a
  unimodal run's ``best.pt`` would be.

Either way the teachers are frozen and are buffers and parameters of this method: saved in
every checkpoint, so a resumed run uses the teachers it trained (a resumed run with a larger
``--epochs`` keeps them, trained for the first run's ``teacher_epochs``).

Differences from BalanceBenchmark, and why:

- its teachers are never put in eval mode, so their BatchNorm normalizes each batch with the
  batch's own statistics (and updates running statistics no forward reads) and any dropout
  stays on: the target of a sample depends on the rest of its batch. A frozen teacher runs in
  eval mode here (``teacher_norm="running"``); ``"batch"`` gives BalanceBenchmark's batch
  statistics (running statistics untouched, dropout off);
- teachers trained within the run (above) are an addition: BalanceBenchmark needs the
  unimodal runs done first; their dropout draws from a generator seeded by the run's seed, so
  the run's own random stream is untouched;
- the unimodal heads of our model are ``fusion_only``'s detached read-outs (they measure the
  encoders and change nothing else); BalanceBenchmark's model has no such heads;
- under DDP a teacher trained in the run averages its gradients over ranks at every step
  (each rank reads its shard; the pass stops when one rank has no batch left) and its
  normalization statistics after every epoch, so every rank holds the same teacher;
- the MSE is computed in float32 under autocast;
- the authors' recipe is BalanceBenchmark's run (``olmbalance.recipes.BALANCEBENCHMARK_RUN``:
  AdamW 1e-3, weight decay 0.01, StepLR(10, 0.1), batch 32, 30 epochs): no authors' run was found.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed
from olmbalance.base import AddedLossTerms, EpochData
from olmbalance.distributed import unwrap
from olmbalance.errors import UserError
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import keep_features, last_features
from olmbalance.olm import heldout_forward
from olmbalance.recipes import BALANCEBENCHMARK_RUN, run_optimizer
from olmbalance.registry import RunContext, Setting, register_method

log = logging.getLogger(__name__)

UMT_DEFAULT_SCALING = 10.0  # configs/trainer_config.yaml UMT.scaling
UMT_DEFAULT_MODULATION = (0, 80)  # UMT.modulation_starts / modulation_ends
TEACHER_NORMS = ("running", "batch")
# Offsets the teachers' dropout seed from the run's other seeded streams.
TEACHER_SEED_OFFSET = 32452843
SETTING = "--unimodal-teacher-teachers"


def parse_teachers(text: str, modalities: Sequence[str]) -> dict[str, str]:
    """``"audio=runs/a,visual=runs/v"`` -> {modality: path}; empty -> {}."""
    sources: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        modality, _, path = item.partition("=")
        modality, path = modality.strip(), path.strip()
        if modality not in modalities or not path or modality in sources:
            raise UserError(f"{SETTING} takes modality=run-folder pairs separated by commas, one per modality of "
                            f"{', '.join(modalities)} (e.g. audio=runs/audio-run); got {item!r}")
        sources[modality] = path
    return sources


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def synchronized(batches):
    """The usable training batches (two samples or more: BatchNorm) while every rank has one."""
    iterator = iter(batches)
    while True:
        item = next((b for b in iterator if b[1].shape[0] >= 2), None)
        have = torch.tensor(float(item is not None), device=distributed.collective_device())
        if float(distributed.all_reduce_mean(have)) < 1:
            return
        yield item


class UnimodalTeacher(AddedLossTerms, FusionOnly):
    """UMT as BalanceBenchmark runs it, with teachers loaded or trained in the run (module docstring)."""

    name = "unimodal_teacher"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, scaling: float = UMT_DEFAULT_SCALING,
                 teachers: str = "", teacher_epochs: int = 0, teacher_norm: str = "running",
                 modulation_epochs: tuple[int, int] = UMT_DEFAULT_MODULATION):
        super().__init__(heads, context)
        if not self.modalities:
            raise UserError(f"--method {self.name} needs modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(scaling) and scaling >= 0):
            raise UserError(f"--unimodal-teacher-scaling must be a non-negative number, got {scaling!r}")
        if teacher_norm not in TEACHER_NORMS:
            raise UserError(f"--unimodal-teacher-teacher-norm must be one of {', '.join(TEACHER_NORMS)}, "
                            f"got {teacher_norm!r}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"UMT modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--unimodal-teacher-modulation-starts, --unimodal-teacher-modulation-ends)")
        self.sources = parse_teachers(teachers, self.modalities)
        if teacher_epochs < 0 or (teacher_epochs == 0 and not self.context.epochs
                                  and set(self.sources) != set(self.modalities)):
            raise UserError(f"--unimodal-teacher-teacher-epochs must be positive, or 0 for the run's epochs "
                            f"(which this run does not give); got {teacher_epochs!r}")
        self.scaling, self.teacher_norm, self.modulation_epochs = float(scaling), teacher_norm, (start, end)
        self.teacher_epochs = int(teacher_epochs) or int(self.context.epochs or 0)
        self.teachers = nn.ModuleDict()  # one frozen encoder per modality, made at setup
        count = len(self.modalities)
        # Buffers: saved in method.state_dict(), so a resumed run keeps its teachers.
        self.register_buffer("teacher_ready", torch.zeros(count, dtype=torch.long))  # 1: loaded or trained
        self.register_buffer("teacher_accuracy", torch.full((count,), -1.0))  # validation acc (-1: loaded)
        self.register_buffer("teacher_epoch", torch.zeros(count, dtype=torch.long))  # the epoch kept (0: loaded)
        self.epoch = 1  # the epoch being trained (1-based), set by start_epoch
        self._ready: list[bool] | None = None  # host copy of teacher_ready (no device read per step)
        self.last: dict[str, torch.Tensor] = {}

    # -- the teachers -----------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        heads = getattr(net, "unimodal_heads", None)
        if heads is None or any(m not in heads or m not in net.encoders for m in self.modalities):
            raise UserError(f"--method {self.name} trains each teacher as the model's encoder and unimodal head "
                            f"of its modality; {type(net).__name__} has no such pair for every modality")
        for m in self.modalities:  # the teachers' places (a resumed run loads its saved ones here)
            self.teachers[m] = frozen(copy.deepcopy(net.encoders[m]))
        for i, m in enumerate(self.modalities):
            if m in self.sources:
                self.load_teacher(m, self.sources[m])
                self.teacher_ready[i] = 1
        self._ready = None

    def load_teacher(self, modality: str, source: str) -> None:
        """The ``modality`` encoder of a run folder's ``best.pt`` (or of a checkpoint file)."""
        path = Path(source).expanduser()
        file = path / "best.pt" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{SETTING}: no checkpoint at {file} for the {modality} teacher; give a run folder "
                            f"of this project (its best.pt), e.g. the folder of a --method {modality}_only run")
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file: one sentence, not a traceback
            raise UserError(f"{SETTING}: {file} could not be read as a checkpoint ({type(error).__name__})") from None
        state = payload.get("model", payload) if isinstance(payload, dict) else {}
        prefix = f"encoders.{modality}."
        encoder_state = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        try:
            self.teachers[modality].load_state_dict(encoder_state)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0][:160]
            raise UserError(f"{SETTING}: the {modality} encoder in {file} does not fit this model ({reason}); "
                            "give a run of the same --encoder and data options") from None
        method = (payload.get("config") or {}).get("method") if isinstance(payload, dict) else None
        if distributed.world_size() == 1 or torch.distributed.get_rank() == 0:
            log.info("UMT: the %s teacher is the encoder of %s (its run's method: %s)", modality, file,
                     method or "unknown")

    def ready(self) -> list[bool]:
        if self._ready is None:
            self._ready = [bool(r) for r in self.teacher_ready.tolist()]
        return self._ready

    def start_epoch(self, epoch: int, model: nn.Module, data: EpochData) -> None:
        self.epoch = epoch
        self._ready = None  # a resumed run's loaded buffers
        pending = [m for m, done in zip(self.modalities, self.ready()) if not done]
        if pending and epoch - 1 <= self.modulation_epochs[1]:  # a teacher no epoch will use is not trained
            self.train_teachers(model, data, pending)

    def train_teachers(self, model: nn.Module, data: EpochData, pending: Sequence[str]) -> None:
        net = unwrap(model)
        device = next(net.parameters()).device
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.autocast(device_type=device.type, enabled=False):
            seed = (self.context.seed or 0) + TEACHER_SEED_OFFSET
            torch.default_generator.manual_seed(seed)
            if forked:
                torch.cuda.manual_seed(seed)
            for m in pending:
                i = self.modalities.index(m)
                state, accuracy, best_epoch = self.train_teacher(net, m, data)
                self.teachers[m].load_state_dict(state)
                self.teacher_ready[i], self.teacher_accuracy[i], self.teacher_epoch[i] = 1, accuracy, best_epoch
                if distributed.world_size() == 1 or torch.distributed.get_rank() == 0:
                    log.info("UMT: %s teacher trained %d epochs; kept epoch %d, validation accuracy %.4f",
                             m, self.teacher_epochs, best_epoch, accuracy)
        self._ready = None

    def train_teacher(self, net: nn.Module, modality: str, data: EpochData):
        """(encoder state, validation accuracy, epoch) of the best epoch of a unimodal copy."""
        encoder, head = copy.deepcopy(net.encoders[modality]), copy.deepcopy(net.unimodal_heads[modality])
        parameters = [p for p in itertools.chain(encoder.parameters(), head.parameters())]
        for p in parameters:
            p.requires_grad_(True)
        optimizer = run_optimizer(parameters, self.context)
        buffers = [b for b in itertools.chain(encoder.buffers(), head.buffers()) if b.is_floating_point()]
        best_accuracy, best_state, best_epoch = -1.0, None, 0
        for epoch in range(1, self.teacher_epochs + 1):
            encoder.train()
            head.train()
            for inputs, labels in synchronized(data.train_batches()):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(head(encoder(inputs[modality])).float(), labels)
                weight = labels.shape[0] * distributed.world_size() if self.context.loss_reduction == "sum" else 1
                (loss * weight).backward()
                for p in parameters:  # what DDP would do: every rank takes the same step
                    if p.grad is not None:
                        p.grad.copy_(distributed.all_reduce_mean(p.grad))
                optimizer.step()
            for b in buffers:  # normalization statistics: the mean over ranks
                b.copy_(distributed.all_reduce_mean(b))
            accuracy = self.validation_accuracy(encoder, head, modality, data)
            if best_state is None or accuracy > best_accuracy or math.isnan(accuracy):
                best_accuracy, best_state, best_epoch = accuracy, copy.deepcopy(encoder.state_dict()), epoch
        if best_state is None:
            raise UserError(f"--method {self.name}: the {modality} teacher had no epoch to train "
                            f"(--unimodal-teacher-teacher-epochs {self.teacher_epochs})")
        return best_state, best_accuracy, best_epoch

    @torch.no_grad()
    def validation_accuracy(self, encoder: nn.Module, head: nn.Module, modality: str, data: EpochData) -> float:
        """Accuracy of the copy on the validation split (eval mode), over every rank; NaN if empty."""
        encoder.eval()
        head.eval()
        counts = None  # (right, seen), summed on the data's device: one read at the end
        for inputs, labels in data.val_batches():
            predicted = head(encoder(inputs[modality])).argmax(dim=1)
            batch = torch.stack([(predicted == labels).sum(), torch.tensor(labels.numel(), device=labels.device)])
            counts = batch.double() if counts is None else counts + batch.double()
        counts = torch.zeros(2, dtype=torch.float64) if counts is None else counts
        counts = distributed.all_reduce_mean(counts.to(distributed.collective_device())).cpu()
        return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")

    # -- the step ---------------------------------------------------------------------------------
    def modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch - 1 <= end

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        net = unwrap(model)
        features = last_features(model)
        net.last_features = {}
        if not self.modulating():
            return logits
        if not all(self.ready()):
            raise UserError(f"--method {self.name} trained a step before its teachers were loaded or trained; "
                            "the loop must call start_epoch before each epoch")
        errors = {}
        for m in self.modalities:
            with torch.no_grad(), heldout_forward(self.teachers[m], self.teacher_norm):
                target = self.teachers[m](inputs[m])
            with torch.autocast(device_type=target.device.type, enabled=False):
                errors[m] = F.mse_loss(target.float(), features[m].float())
        self.extra_loss = self.scaling * sum(errors.values())
        self.last = {"umt_mse": torch.stack([errors[h].detach() if h in errors else torch.zeros((), device=labels.device)
                                             for h in self.heads])}
        return logits





@register_method(
    "unimodal_teacher", prefix="unimodal_teacher",
    settings=(Setting("scaling", float, UMT_DEFAULT_SCALING, "weight of each modality's teacher-feature MSE"),
              Setting("teachers", str, "",
                      "modality=run-folder pairs (e.g. audio=runs/A,visual=runs/V: audio_only/visual_only runs' "
                      "best.pt); a modality not named gets its teacher trained in this run before epoch 1"),
              Setting("teacher_epochs", int, 0, "epochs of a teacher trained in the run (0: the run's epochs)"),
              Setting("teacher_norm", str, "running",
                      "teachers' normalization: running statistics (eval mode) or each batch's (BalanceBenchmark)",
                      TEACHER_NORMS),
              Setting("modulation_starts", int, UMT_DEFAULT_MODULATION[0], "first epoch (0-based) with the MSE terms"),
              Setting("modulation_ends", int, UMT_DEFAULT_MODULATION[1],
                      "last epoch (0-based, inclusive) with the MSE terms")),
    recipes={"authors": {"*": BALANCEBENCHMARK_RUN}},
    summary="UMT, uni-modal teachers' features distilled into the encoders (Du et al., ICML 2023)")
def unimodal_teacher(heads, context, scaling, teachers, teacher_epochs, teacher_norm, modulation_starts,
                     modulation_ends):
    return UnimodalTeacher(heads, context, scaling=scaling, teachers=teachers, teacher_epochs=teacher_epochs,
                           teacher_norm=teacher_norm, modulation_epochs=(modulation_starts, modulation_ends))

"""The one training loop behind MacCap, TOMCap and the shapes world.

A method hands over a ``TrainTask`` (its model, a map-style dataset, a collate function and
``loss_fn(model, batch) -> scalar``) and ``train`` does the rest: AdamW with linear warmup then
cosine decay, autocast on GPU (bf16, or fp16 with a GradScaler), gradient clipping and
accumulation, data parallel training under ``torchrun``, a tqdm bar, a JSON history with its
curves drawn beside it (``curves.html``; TensorBoard scalars too when ``tensorboard_dir`` is set), and
checkpoints from which ``resume=True`` continues a killed run exactly.

What a task can rely on, and what it must respect:

* **Trainable means requires_grad.** Only parameters with ``requires_grad`` are optimised and
  checkpointed; frozen ones (a pretrained LM, CLIP) are the task's to rebuild and are never
  written. Trainable parameters must be float32 (autocast supplies the low precision). Buffers
  are not checkpointed, so trainable parts must not update buffers while training.
* **Data order is a function of (seed, step).** Step ``s`` reads batch ``s % steps_per_epoch``
  of a permutation drawn from (seed, epoch); each rank takes a contiguous slice of that global
  batch, split further into ``grad_accum`` micro-batches. An epoch's incomplete last batch is
  dropped. ``dataset[i]`` must be deterministic (no augmentation randomness in workers).
* **Randomness is a function of (seed, step, micro-batch, rank).** The global torch RNG is
  re-seeded from these before every ``loss_fn`` call, so dropout and noise injection drawn from
  torch's default generator repeat exactly after a resume, and no RNG state needs saving. Draw
  from torch, not ``random`` or numpy. Ranks draw different noise for their different samples.
* **The loss is a mean over its micro-batch.** The loop averages over micro-batches and ranks,
  so the gradient is that of the mean over the global batch whatever the world size.
* ``loss_fn`` receives the bare model and a batch already on the device: it never sees DDP,
  autocast or the loss scale. The loop calls ``model.train()``; a model whose frozen parts must
  stay in eval mode overrides ``train``.

Under ``torchrun`` every rank calls ``train``. The model is wrapped in DistributedDataParallel
through a module whose ``forward`` is ``loss_fn``, so only trainable gradients are all-reduced and
a frozen LM is never broadcast. Rank 0 alone writes checkpoints and the history and runs
``TrainTask.evaluate``; all ranks read the same checkpoint on resume (a shared filesystem).

Checkpoints (one safetensors file per step, never left corrupt) are :mod:`training.checkpoints`;
the data order and seeds :mod:`training.data_order`; devices and ranks :mod:`training.distributed`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from capdemo.config import Config, differing_keys
from capdemo.fileio import atomic_output, save_safetensors
from training.checkpoints import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    checkpoint_paths,
    latest_checkpoint,
    remove_stale_temp_files,
    write_json_atomically,
)
from training.curves import CURVES_FILE, require_tensorboard, tensorboard_writer, write_curves
from training.data_order import DataOrder, StepRangeSampler, derive_seed
from training.distributed import DEVICES, DistEnv, distributed_session

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype per precision
WARMUP_RUN_FRACTION = 10  # a warm-up over 1/10 of the run is warned about (and clamped by effective_warmup)
# Config fields that may differ between a run and its resume: none of them changes the weights.
_RESUMABLE_CHANGES = frozenset(
    {"out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "num_workers", "tensorboard_dir"})
HISTORY_FILE = "history.json"  # the run's loss history in out_dir; CURVES_FILE draws it beside


@dataclass
class TrainConfig(Config):
    """How to optimise a task; the model's own settings live in the method's config."""

    out_dir: str = "runs/train"  # checkpoints/, history.json and curves.html go here; resume reads from here
    seed: int = 0  # data order and per-step randomness are derived from it (model init is the task's)
    batch_size: int = 64  # global batch: samples per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per step on each rank; batch_size % (world_size * grad_accum) == 0
    epochs: int = 1  # run length in passes over the dataset, used when max_steps is None
    max_steps: int | None = None  # run length in optimizer steps; overrides epochs when set
    lr: float = 1e-4  # peak learning rate, reached at the last warmup step
    min_lr_ratio: float = 0.0  # the cosine decays towards lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup: step i (0-based) uses lr * (i + 1) / warmup_steps
    weight_decay: float = 0.01  # AdamW decoupled decay, on weights with >= 2 dims only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float | None = 1.0  # max L2 norm of the whole (unscaled) gradient; None = no clipping
    precision: str = "auto"  # one of PRECISIONS; auto = bf16 where the GPU has it, else fp16; fp32 on CPU
    device: str = "auto"  # one of DEVICES; auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 3  # newest checkpoints kept on disk; older ones are deleted
    log_every: int = 10  # steps per history entry (its loss is the mean over those steps)
    eval_every: int = 0  # steps between TrainTask.evaluate calls; 0 = only after the last step
    num_workers: int = 0  # DataLoader worker processes per rank
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient in a step
    tensorboard_dir: str | None = None  # also log loss, lr, grad norm, evaluations to TensorBoard here (rank 0)

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device must be one of {', '.join(DEVICES)}, got {self.device!r}")


@dataclass
class TrainTask:
    """What a method hands to the loop: a model, its data and its loss (see the module docstring)."""

    model: nn.Module  # trainable parts have requires_grad=True, everything else is frozen
    dataset: Dataset  # map-style: len() and deterministic dataset[i]
    collate_fn: Callable[[list[Any]], Any]  # samples -> batch of tensors (nested in dicts/lists/tuples is fine)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]  # (bare model, batch on device) -> scalar mean loss
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None  # rank 0 only, eval mode, no_grad
    # What else a resumed run must match, as flat JSON values: the model's settings, fingerprints of its data.
    # Stored in every checkpoint; a resume that differs in any key is refused with the keys named.
    identity: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a finished (or deliberately stopped) run leaves behind."""

    step: int  # optimizer steps completed
    finished: bool  # the run reached its last step (False when stop_after cut it short)
    history: list[dict[str, float]]  # per log interval: step, mean loss, lr and grad_norm of its last step
    evaluations: list[dict[str, float]]  # one entry per evaluation: step and the task's metrics
    checkpoint: Path | None  # the newest complete checkpoint of this run


# ----------------------------------------------------------------------------- schedule and precision


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup uses lr/W, 2lr/W, ..., lr over steps 0..W-1 (no step is wasted at lr 0); the cosine
    then falls from lr at step W towards lr * min_lr_ratio, reached one step after the last.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """A warm-up of at most a tenth of the run: ``min(warmup_steps, total_steps // 10)``.

    For a method's *default* warm-up (e.g. the reference code's 200 steps), so a short run is not mostly warm-up.
    The loop itself never changes the warm-up it is given (an explicit setting stays exact, and existing runs
    resume and reproduce unchanged); it warns instead (``Trainer``).
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    return min(warmup_steps, total_steps // WARMUP_RUN_FRACTION)


def frozen_weights_dtype(precision: str) -> torch.dtype:
    """The dtype to hold a frozen pretrained model in for a run of ``precision`` (already resolved):
    autocast's own dtype, so no fp16 tensor carries gradients without a loss scaler; else float32."""
    return AMP_DTYPES.get(precision, torch.float32)


def resolve_precision(precision: str, *, device: torch.device) -> str:
    """The precision a run uses: autocast is for CUDA only, so CPU runs are fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        if precision in ("auto", "fp32"):
            return "fp32"
        raise ValueError(f"precision {precision!r} needs a CUDA device; use 'auto' or 'fp32' on {device.type}")
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def clip_and_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  params: Sequence[nn.Parameter], *, max_norm: float | None) -> torch.Tensor:
    """Clip the true gradient and step; returns its norm before clipping.

    The gradient is unscaled before it is measured: clipping a loss-scaled fp16 gradient would
    compare the threshold with a norm inflated by the scale. The scaler skips the step (and
    lowers its scale) when the gradient overflowed.
    """
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
    scaler.step(optimizer)
    scaler.update()
    return norm


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (also inside dicts, lists, tuples, or objects with ``.to``) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    return batch


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` behind ``forward``, so DDP can hook the backward of any loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


# ----------------------------------------------------------------------------- the trainer


def _trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    for name, param in trainable.items():
        if param.dtype != torch.float32:
            raise ValueError(f"trainable parameter {name} is {param.dtype}; keep trainable weights in float32"
                             " (autocast provides the low precision)")
    return trainable


class Trainer:
    """One rank's share of a run: the model on its device, AdamW, the data order and the checkpoints."""

    def __init__(self, task: TrainTask, config: TrainConfig, *, env: DistEnv):
        self.task, self.config, self.env = task, config, env
        self.device = env.device
        self.precision = resolve_precision(config.precision, device=self.device)
        self.model = task.model.to(self.device)
        self.params = _trainable_parameters(self.model)  # name -> trainable parameter
        self.optimizer = self._adamw()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.order = DataOrder(dataset_size=len(task.dataset), batch_size=config.batch_size, seed=config.seed)
        self.order.micro_batch_size(world_size=env.world_size, grad_accum=config.grad_accum)  # fails early if uneven
        self.total_steps = config.max_steps or config.epochs * self.order.steps_per_epoch
        if config.warmup_steps > effective_warmup(config.warmup_steps, self.total_steps) and env.is_main:
            log.warning("warm-up of %d steps is over a tenth of this %d-step run (at most %d advised)",
                        config.warmup_steps, self.total_steps, effective_warmup(config.warmup_steps, self.total_steps))
        self.checkpoint_dir = Path(config.out_dir) / "checkpoints"
        self.identity = json.loads(json.dumps(dict(task.identity)))  # as a checkpoint reads back (tuples: lists)
        self.forward = self._loss_module()
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.evaluations: list[dict[str, float]] = []
        self._pending_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # loss sum since last log
        self._pending_steps = 0
        self._tensorboard: Any = None  # rank 0's SummaryWriter while fit runs, when config.tensorboard_dir is set
        if config.tensorboard_dir:
            require_tensorboard()  # every rank fails here, before any work, when tensorboard is missing

    def _adamw(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; biases and norm weights (1-d) get no weight decay."""
        decayed = [p for p in self.params.values() if p.ndim >= 2]
        plain = [p for p in self.params.values() if p.ndim < 2]
        groups = [{"params": decayed, "weight_decay": self.config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr,
                                 betas=self.config.betas, eps=self.config.eps)

    def _optimizer_index(self) -> dict[str, int]:
        """Parameter name -> the number the optimizer's state_dict gives that parameter."""
        numbered = (p for group in self.optimizer.param_groups for p in group["params"])
        number = {id(param): i for i, param in enumerate(numbered)}
        return {name: number[id(param)] for name, param in self.params.items()}

    def _loss_module(self) -> nn.Module:
        """The loss behind ``forward``; under DDP only the trainable parameters are reduced.

        ``init_sync=False`` skips DDP's start-up broadcast of every parameter (a frozen LM would be
        gigabytes); ``fit`` broadcasts the trainable ones itself.
        """
        module = _LossModule(self.model, self.task.loss_fn)
        if self.env.world_size == 1:
            return module
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            init_sync=False, broadcast_buffers=False, find_unused_parameters=self.config.find_unused_parameters)

    # ---- one optimizer step

    def micro_batches(self, step: int) -> list[Any]:
        """This rank's collated micro-batches of ``step``, read straight from the dataset."""
        indices = self.order.micro_batches(step, rank=self.env.rank, world_size=self.env.world_size,
                                           grad_accum=self.config.grad_accum)
        return [self.task.collate_fn([self.task.dataset[i] for i in part]) for part in indices]

    def accumulate_gradients(self, step: int, micro_batches: Sequence[Any] | None = None) -> torch.Tensor:
        """Backward the loss of ``step``'s global batch into ``.grad`` (averaged over ranks).

        Returns this rank's mean micro-batch loss (detached, float64). Gradients are loss-scaled
        when the precision is fp16.
        """
        micro_batches = self.micro_batches(step) if micro_batches is None else micro_batches
        amp_dtype = AMP_DTYPES.get(self.precision)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(micro_batches):
            is_last = micro == len(micro_batches) - 1
            sync = nullcontext() if is_last or self.env.world_size == 1 else self.forward.no_sync()
            torch.manual_seed(derive_seed(self.config.seed, "step", step, micro, self.env.rank))
            with sync:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = self.forward(_to_device(batch, self.device))
                if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach().to(torch.float64)
        return total / len(micro_batches)

    def apply_gradients(self, step: int) -> tuple[float, torch.Tensor]:
        """Take the AdamW step of ``step`` at its scheduled lr; returns (lr, gradient norm before clipping)."""
        lr = lr_at(step, lr=self.config.lr, warmup_steps=self.config.warmup_steps,
                   total_steps=self.total_steps, min_lr_ratio=self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = clip_and_step(self.optimizer, self.scaler, list(self.params.values()), max_norm=self.config.grad_clip)
        return lr, norm

    # ---- the run

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to the last step, or until step ``stop_after`` as if killed there (no extra checkpoint)."""
        checkpoint = self._start(resume=resume)
        if self.config.tensorboard_dir and self.env.is_main:
            # a resumed run logs from step + 1 on (entries are numbered by steps done): what a killed run logged
            # from there is dropped, what it logged up to the checkpoint stays
            self._tensorboard = tensorboard_writer(self.config.tensorboard_dir,
                                                   purge_step=self.step + 1 if self.step else None)
        try:
            checkpoint = self._run(checkpoint, stop_after=stop_after)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
        self._write_history(curves=True)
        return TrainResult(step=self.step, finished=self.step == self.total_steps, history=list(self.history),
                           evaluations=list(self.evaluations), checkpoint=checkpoint)

    def _run(self, checkpoint: Path | None, *, stop_after: int | None) -> Path | None:
        """The steps from the current one to the end (or ``stop_after``); returns the newest checkpoint."""
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        loader = DataLoader(
            self.task.dataset, collate_fn=self.task.collate_fn, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            batch_sampler=StepRangeSampler(self.order, start=self.step, end=end, rank=self.env.rank,
                                            world_size=self.env.world_size, grad_accum=self.config.grad_accum))
        batches = iter(loader)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", disable=not self.env.is_main)
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < end:
            step = self.step
            loss = self.accumulate_gradients(step, [next(batches) for _ in range(self.config.grad_accum)])
            lr, grad_norm = self.apply_gradients(step)
            self._pending_loss += loss
            self._pending_steps += 1
            self.step = step + 1
            interval_steps += 1
            is_last = self.step == self.total_steps
            if self.step % self.config.log_every == 0 or is_last:
                entry = self._log(lr=lr, grad_norm=grad_norm)
                now = time.perf_counter()
                samples_per_s = interval_steps * self.config.batch_size / max(now - interval_start, 1e-9)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}")
                interval_start, interval_steps = now, 0
            if (self.config.eval_every and self.step % self.config.eval_every == 0) or is_last:
                self._evaluate()
            if (self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0) or is_last:
                checkpoint = self.save_checkpoint()
            bar.update(1)
        bar.close()
        return checkpoint

    def _start(self, *, resume: bool) -> Path | None:
        """Restore the newest checkpoint if asked to, and give every rank rank 0's trainable weights."""
        if self.env.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.checkpoint_dir)
        found = latest_checkpoint(self.checkpoint_dir)
        if found is not None and not resume:
            raise CheckpointError(f"{self.checkpoint_dir} already holds checkpoints; pass resume=True to continue"
                                  " that run, or use another out_dir")
        if found is not None:
            self.restore(found)
            log.info("resuming from %s (step %d of %d)", found.path, self.step, self.total_steps)
        if self.env.world_size > 1:  # also a barrier: no rank trains before all have read the checkpoint
            with torch.no_grad():
                for param in self.params.values():
                    dist.broadcast(param, src=0)
        return None if found is None else found.path

    def _log(self, *, lr: float, grad_norm: torch.Tensor) -> dict[str, float]:
        """Close a log interval: the mean loss over its steps and all ranks, in the history."""
        self._average_pending_loss_over_ranks()
        mean_loss = (self._pending_loss / self._pending_steps).item()
        entry = {"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item()}
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"the training loss is {entry['loss']} at step {self.step};"
                                     " lower lr or check the data")
        self.history.append(entry)
        if self._tensorboard is not None:
            for name in ("loss", "lr", "grad_norm"):
                self._tensorboard.add_scalar(f"train/{name}", entry[name], self.step)
        self._pending_loss.zero_()
        self._pending_steps = 0
        if self.env.is_main:
            self._write_history()
        return entry

    def _average_pending_loss_over_ranks(self) -> None:
        """Give every rank the rank-average of the loss summed since the last log.

        Called when an interval closes and before a checkpoint stores the partial sum, so that a
        resumed run (where every rank reads rank 0's value) logs what an uninterrupted one would.
        """
        if self.env.world_size > 1:
            dist.all_reduce(self._pending_loss)
            self._pending_loss /= self.env.world_size

    def _evaluate(self) -> None:
        """Run the task's evaluation on rank 0 (eval mode, no_grad, seeded), and record its metrics."""
        if self.task.evaluate is None or not self.env.is_main:
            return
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(derive_seed(self.config.seed, "eval", self.step))
        with torch.no_grad():
            metrics = {name: float(value) for name, value in self.task.evaluate(self.model).items()}
        self.model.train(was_training)
        self.evaluations.append({"step": self.step, **metrics})
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"eval/{name}", value, self.step)
        log.info("step %d evaluation: %s", self.step, metrics)

    def _write_history(self, *, curves: bool = False) -> None:
        """history.json (rank 0); with ``curves`` also curves.html, drawn once a run ends (~0.2 s a page)."""
        if not self.env.is_main:
            return
        out_dir = Path(self.config.out_dir)
        write_json_atomically(out_dir / HISTORY_FILE, {"train": self.history, "eval": self.evaluations})
        if curves:
            write_curves(out_dir / CURVES_FILE, self.history, self.evaluations, title=f"{out_dir.name}: training")

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (rank 0 writes; every rank must call this)."""
        path = checkpoint_path(self.checkpoint_dir, self.step)
        self._average_pending_loss_over_ranks()  # collective: every rank calls save_checkpoint
        if not self.env.is_main:
            return path
        tensors = {f"model/{name}": param.detach().cpu().contiguous() for name, param in self.params.items()}
        for name, param in self.params.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optim/{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        state = {
            "step": self.step,
            "epoch": self.step // self.order.steps_per_epoch,  # for people reading the file; derived from step
            "dataset_size": self.order.dataset_size,
            "world_size": self.env.world_size,
            "precision": self.precision,
            "config": self.config.to_dict(),
            "identity": self.identity,
            "grad_scaler": self.scaler.state_dict(),
            "pending_loss": [self._pending_loss.item(), self._pending_steps],
            "history": self.history,
            "evaluations": self.evaluations,
        }
        metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(state)}
        with atomic_output(path, durable=True) as temp:
            save_safetensors(tensors, temp, metadata)
        for old in checkpoint_paths(self.checkpoint_dir)[: -self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: weights, AdamW moments, loss scale, step and history."""
        state = checkpoint.state
        self._check_same_run(checkpoint)
        weights = checkpoint.model_state()
        if set(weights) != set(self.params):
            missing, unexpected = sorted(set(self.params) - set(weights)), sorted(set(weights) - set(self.params))
            raise CheckpointError(f"{checkpoint.path}: trainable parameters differ (missing {missing[:3]},"
                                  f" unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, param in self.params.items():
                if weights[name].shape != param.shape:
                    raise CheckpointError(f"{checkpoint.path}: {name} has shape {tuple(weights[name].shape)},"
                                          f" the model has {tuple(param.shape)}")
                param.copy_(weights[name])
        index = self._optimizer_index()
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in checkpoint.tensors.items():
            if key.startswith("optim/"):
                name, stat = key.removeprefix("optim/").rsplit("/", 1)
                moments.setdefault(index[name], {})[stat] = value
        self.optimizer.load_state_dict({"state": moments, "param_groups": self.optimizer.state_dict()["param_groups"]})
        if self.scaler.is_enabled() and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = checkpoint.step
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        pending_loss, self._pending_steps = state["pending_loss"]
        self._pending_loss.fill_(pending_loss)

    def _check_same_run(self, checkpoint: Checkpoint) -> None:
        """Refuse a checkpoint whose run would continue differently (other settings or data)."""
        saved, now = checkpoint.state["config"], self.config.to_dict()
        changed = sorted(name for name in now if name not in _RESUMABLE_CHANGES and saved.get(name) != now[name])
        if changed:
            raise CheckpointError(f"{checkpoint.path}: settings changed since this checkpoint ({', '.join(changed)});"
                                  " resume with the same settings or use another out_dir")
        if checkpoint.state["dataset_size"] != self.order.dataset_size:
            raise CheckpointError(f"{checkpoint.path}: the dataset had {checkpoint.state['dataset_size']} samples,"
                                  f" it now has {self.order.dataset_size}")
        # checkpoints written before identities were stored have nothing to compare
        changed = differing_keys(checkpoint.state.get("identity", self.identity), self.identity)
        if changed:
            raise CheckpointError(f"{checkpoint.path}: the model or its data changed since this checkpoint"
                                  f" ({', '.join(changed)}); resume the same run or use another out_dir")
        if checkpoint.state.get("world_size", self.env.world_size) != self.env.world_size:
            log.warning("resuming a %d-process run on %d processes: per-rank noise differs, so the result will not"
                        " be bit-identical to an uninterrupted run", checkpoint.state["world_size"],
                        self.env.world_size)


def train(task: TrainTask, config: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train ``task`` under ``config`` on every rank (launch with ``torchrun`` for data parallel).

    ``resume`` continues from the newest complete checkpoint in ``config.out_dir`` (or starts
    fresh if there is none); without it, existing checkpoints are an error. ``stop_after`` ends
    the run after that many steps without a final checkpoint, as a kill would (for tests).
    """
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0, got {stop_after}")
    with distributed_session(device=config.device) as env:
        return Trainer(task, config, env=env).fit(resume=resume, stop_after=stop_after)

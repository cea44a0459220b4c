"""A toy regression task for the training-loop tests, and a script that trains it in its own process.

The tests build the task in-process for reference runs, and run this module as a script where
they need a process of its own: to SIGKILL it mid-run, or to be one rank of a 2-process gloo
group (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by the test, as torchrun
would). Usage::

    python -m tests.ddp_worker train --config '<TrainConfig JSON>' [--resume] [--step-delay S]
    python -m tests.ddp_worker ddp --config '<TrainConfig JSON>' --results DIR

``ddp`` writes, per rank, the step-0 gradient of the global batch (``grads-rank<R>.safetensors``),
then trains twice, once whole and once stopped a step before the end and resumed, and writes each
run's final trainable weights (``weights-<run>-rank<R>.safetensors``) and loss history
(``history-<run>-rank<R>.json``), with run = whole | resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, default_collate

from training.distributed import distributed_session
from training.loop import TrainConfig, Trainer, TrainTask, train

DIM_IN = 6  # features per sample
HIDDEN = 16  # width of the trainable head


class ToyRegressor(nn.Module):
    """A frozen linear "encoder" under a small trainable head (Linear, LayerNorm, GELU, Dropout, Linear)."""

    def __init__(self, *, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(DIM_IN, DIM_IN)  # stands in for a frozen pretrained model
        self.encoder.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(HIDDEN, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)  # (B,)


class ToyDataset(Dataset):
    """``n`` samples of y = x . w + small noise, fixed by ``seed``."""

    def __init__(self, n: int = 64, *, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM_IN, generator=generator)  # (n, DIM_IN)
        weights = torch.randn(DIM_IN, generator=generator)  # (DIM_IN,)
        self.y = self.x @ weights + 0.1 * torch.randn(n, generator=generator)  # (n,)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class RegressionLoss:
    """MSE with optional input noise (drawn from torch's default RNG, as the loop's contract says)."""

    def __init__(self, *, noise_std: float = 0.0, step_delay: float = 0.0):
        self.noise_std = noise_std
        self.step_delay = step_delay  # seconds slept per call: makes a run slow enough to kill mid-way

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.step_delay:
            time.sleep(self.step_delay)
        x = batch["x"]
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return F.mse_loss(model(x), batch["y"])


def toy_task(*, noise_std: float = 0.0, dropout: float = 0.0, step_delay: float = 0.0, n: int = 64) -> TrainTask:
    return TrainTask(model=ToyRegressor(dropout=dropout), dataset=ToyDataset(n), collate_fn=default_collate,
                     loss_fn=RegressionLoss(noise_std=noise_std, step_delay=step_delay))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _run_ddp(config: TrainConfig, results: Path) -> None:
    with distributed_session(device="cpu") as env:
        trainer = Trainer(toy_task(), config, env=env)
        trainer.accumulate_gradients(0)
        grads = {name: p.grad.detach().clone() for name, p in trainer.params.items()}
        save_file(grads, results / f"grads-rank{env.rank}.safetensors")
        del trainer
        for run, stop_after in (("whole", None), ("resumed", config.max_steps - 1)):
            run_config = config.replace(out_dir=f"{config.out_dir}-{run}")
            if stop_after is not None:
                train(toy_task(), run_config, stop_after=stop_after)
            task = toy_task()
            result = train(task, run_config, resume=stop_after is not None)
            save_file(trainable_state(task.model), results / f"weights-{run}-rank{env.rank}.safetensors")
            (results / f"history-{run}-rank{env.rank}.json").write_text(json.dumps(result.history))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "ddp"], help="train the toy task, or be one rank of the DDP test")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--resume", action="store_true", help="train: continue from the newest checkpoint")
    parser.add_argument("--noise-std", type=float, default=0.0, help="train: input noise in the loss")
    parser.add_argument("--dropout", type=float, default=0.0, help="train: dropout in the head")
    parser.add_argument("--step-delay", type=float, default=0.0, help="train: seconds slept per micro-batch")
    parser.add_argument("--results", type=Path, help="ddp: folder for gradients, weights and history")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same arithmetic as the single-threaded in-process reference runs
    config = TrainConfig.from_dict(json.loads(args.config))
    if args.mode == "ddp":
        _run_ddp(config, args.results)
    else:
        task = toy_task(noise_std=args.noise_std, dropout=args.dropout, step_delay=args.step_delay)
        train(task, config, resume=args.resume)


if __name__ == "__main__":
    main()

"""The shared training loop: schedule, exact resume, crash safety, frozen weights, DDP on CPU."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.ddp_worker import toy_task, trainable_state
from training.checkpoints import CheckpointError, checkpoint_paths, latest_checkpoint, load_checkpoint
from training.data_order import DataOrder
from training.distributed import DistEnv
from training.loop import (
    TrainConfig,
    Trainer,
    TrainTask,
    clip_and_step,
    effective_warmup,
    lr_at,
    resolve_precision,
    train,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
NOISY = {"noise_std": 0.1, "dropout": 0.1}  # the resume runs use per-step randomness on purpose

# 64 samples / batch 8 = 8 steps per epoch, 2 epochs = 16 steps; every run below that resumes
# uses exactly these settings (out_dir aside), so they must all end where the reference ends.
# Checkpoints (every 2) fall inside log intervals (every 3): the partial loss sum must survive too.
RESUME_SETTINGS = dict(seed=3, batch_size=8, grad_accum=2, epochs=2, lr=1e-2, warmup_steps=3, min_lr_ratio=0.1,
                       checkpoint_every=2, keep_checkpoints=3, log_every=3, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons with runs in other processes need the same (single-threaded) CPU kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with RESUME_SETTINGS: its task, result and final checkpoint."""
    torch.set_num_threads(1)
    task = toy_task(**NOISY)
    result = train(task, TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path_factory.mktemp("reference"))))
    return task, result, load_checkpoint(result.checkpoint)


def assert_same_run(task, result, reference) -> None:
    """Weights, AdamW state and history bit-identical to the reference run."""
    ref_task, ref_result, ref_checkpoint = reference
    assert result.finished and result.step == ref_result.step == 16
    for name, value in trainable_state(ref_task.model).items():
        assert torch.equal(trainable_state(task.model)[name], value), name
    final = load_checkpoint(result.checkpoint)
    assert final.tensors.keys() == ref_checkpoint.tensors.keys()
    assert any(key.endswith("/exp_avg_sq") for key in final.tensors)
    for key, value in ref_checkpoint.tensors.items():
        assert torch.equal(final.tensors[key], value), key
    assert result.history == ref_result.history


# ----------------------------------------------------------------------------- pure parts


def test_effective_warmup_is_at_most_a_tenth_of_the_run():
    assert effective_warmup(200, 10_000) == 200
    assert effective_warmup(200, 1_500) == 150
    assert effective_warmup(200, 120) == 12
    assert effective_warmup(5, 9) == 0  # under 10 steps: no warm-up
    assert effective_warmup(0, 100) == 0
    with pytest.raises(ValueError, match="total_steps >= 1"):
        effective_warmup(10, 0)


def test_a_warmup_over_a_tenth_of_the_run_is_warned_about_once_and_kept(caplog):
    caplog.set_level("WARNING", logger="training.loop")
    env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
    Trainer(toy_task(), TrainConfig(batch_size=8, max_steps=20, warmup_steps=2), env=env)
    assert not caplog.records  # 2 of 20 steps: exactly a tenth
    trainer = Trainer(toy_task(), TrainConfig(batch_size=8, max_steps=20, warmup_steps=3), env=env)
    assert [r.getMessage() for r in caplog.records] == [
        "warm-up of 3 steps is over a tenth of this 20-step run (at most 2 advised)"]
    trainer.accumulate_gradients(0)
    lr, _ = trainer.apply_gradients(0)
    assert lr == pytest.approx(trainer.config.lr / 3)  # the loop keeps the warm-up it was given


def test_lr_schedule_matches_hand_computed_values():
    schedule = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert lr_at(0, **schedule) == pytest.approx(0.25)
    assert lr_at(2, **schedule) == pytest.approx(0.75)
    assert lr_at(3, **schedule) == pytest.approx(1.0)
    assert lr_at(4, **schedule) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(9, **schedule) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(13, **schedule) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_at(0, lr=2e-4, warmup_steps=0, total_steps=10) == pytest.approx(2e-4)
    assert lr_at(10, lr=2e-4, warmup_steps=0, total_steps=10) == pytest.approx(0.0, abs=1e-15)


def test_config_round_trips_and_rejects_bad_values():
    config = TrainConfig(betas=(0.8, 0.95), grad_clip=None, max_steps=7)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, field in [({"precision": "fp8"}, "precision"), ({"grad_accum": 0}, "grad_accum"),
                       ({"grad_clip": -1.0}, "grad_clip"), ({"device": "tpu"}, "device")]:
        with pytest.raises(ValueError, match=field) as err:
            TrainConfig(**bad)
        assert "\n" not in str(err.value)


def test_precision_is_fp32_on_cpu_and_amp_needs_cuda():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", device=cpu) == resolve_precision("fp32", device=cpu) == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("bf16", device=cpu)


def test_data_order_covers_each_epoch_once_and_shards_partition_the_global_batch():
    order = DataOrder(dataset_size=21, batch_size=4, seed=5)  # 5 steps per epoch, one sample dropped
    epoch0 = [i for step in range(5) for i in order.global_batch(step)]
    epoch1 = [i for step in range(5, 10) for i in order.global_batch(step)]
    assert len(set(epoch0)) == len(set(epoch1)) == 20 and epoch0 != epoch1
    assert DataOrder(dataset_size=21, batch_size=4, seed=5).global_batch(7) == order.global_batch(7)
    shards = [order.micro_batches(7, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    assert [i for shard in shards for part in shard for i in part] == order.global_batch(7)
    assert all(len(part) == 1 for shard in shards for part in shard)
    with pytest.raises(ValueError, match="divisible by world_size"):
        order.micro_batches(0, rank=0, world_size=3, grad_accum=1)


def test_clip_and_step_clips_the_unscaled_gradient():
    """With a 1024x loss scale, the reported norm and the update are those of the true gradient."""
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((weight * torch.tensor([3.0, 4.0])).sum()).backward()  # true gradient (3, 4), norm 5
    norm = clip_and_step(optimizer, scaler, [weight], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(weight.detach(), torch.tensor([3.0 - 0.5 * 0.6, 4.0 - 0.5 * 0.8]))


# ----------------------------------------------------------------------------- exact resume


def test_stop_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, reference):
    config = TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path))
    stopped = train(toy_task(**NOISY), config, stop_after=9)  # last checkpoint: step 8, mid log interval
    assert not stopped.finished and stopped.step == 9 and stopped.checkpoint.name == "step-00000008.safetensors"
    task = toy_task(**NOISY)  # a fresh process would rebuild the model like this
    resumed = train(task, config.replace(num_workers=1), resume=True)  # workers do not change the data order
    assert_same_run(task, resumed, reference)
    assert [entry["step"] for entry in resumed.history] == [3, 6, 9, 12, 15, 16]
    schedule = dict(lr=1e-2, warmup_steps=3, total_steps=16, min_lr_ratio=0.1)
    lrs = [entry["lr"] for entry in resumed.history]  # the lr of each interval's last step
    assert lrs == [lr_at(entry["step"] - 1, **schedule) for entry in resumed.history]
    assert [path.name for path in checkpoint_paths(tmp_path / "checkpoints")] == [
        "step-00000012.safetensors", "step-00000014.safetensors", "step-00000016.safetensors"]
    assert json.loads((tmp_path / "history.json").read_text())["train"] == resumed.history


def test_checkpoints_without_resume_are_an_error_and_changed_settings_are_refused(tmp_path):
    config = TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path))
    train(toy_task(), config, stop_after=2)
    with pytest.raises(CheckpointError, match="resume=True"):
        train(toy_task(), config)
    with pytest.raises(CheckpointError, match=r"settings changed since this checkpoint \(lr\)"):
        train(toy_task(), config.replace(lr=5e-3), resume=True)


def test_a_resume_with_another_model_or_data_is_refused_by_key(tmp_path):
    """The task's identity (model settings, data fingerprints) is stored with the checkpoint and must match."""
    from dataclasses import replace

    config = TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path))
    identity = {"model.noise": 0.016, "corpus_sha256": "abc", "targets": ("nearest", 4)}
    train(replace(toy_task(), identity=identity), config, stop_after=2)
    changed = {**identity, "model.noise": 0.1, "corpus_sha256": "abd"}
    with pytest.raises(CheckpointError, match=r"model or its data changed .*\(corpus_sha256, model.noise\)"):
        train(replace(toy_task(), identity=changed), config, resume=True)
    with pytest.raises(CheckpointError, match=r"\(extra\)"):
        train(replace(toy_task(), identity={**identity, "extra": 1}), config, resume=True)
    resumed = train(replace(toy_task(), identity=identity), config, resume=True)  # tuples read back as lists
    assert resumed.finished and resumed.step > 2


def test_frozen_weights_follow_the_autocast_dtype():
    from training.loop import frozen_weights_dtype

    assert frozen_weights_dtype("bf16") is torch.bfloat16
    assert frozen_weights_dtype("fp16") is torch.float16  # with the GradScaler fp16 runs always have
    assert frozen_weights_dtype("fp32") is torch.float32


def test_truncated_checkpoints_are_never_picked(tmp_path, reference, caplog):
    config = TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path))
    train(toy_task(**NOISY), config, stop_after=11)  # checkpoints 6, 8, 10
    directory = tmp_path / "checkpoints"
    newest = directory / "step-00000010.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as a disk or copy failure would
    (directory / ".step-00000012.safetensors.999.tmp").write_bytes(b"half a checkpoint")  # a killed writer's
    (directory / ".tmpXy34Zw").write_bytes(b"half a checkpoint")  # safetensors' own temp file inside save_file
    assert latest_checkpoint(directory).step == 8
    assert "skipping a broken checkpoint" in caplog.text and "step-00000010" in caplog.text
    task = toy_task(**NOISY)
    assert_same_run(task, train(task, config, resume=True), reference)
    assert not [path.name for path in directory.iterdir() if path.name.startswith(".")]

    for path in checkpoint_paths(directory):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint") as err:
        train(toy_task(**NOISY), config, resume=True)
    assert "\n" not in str(err.value)


def _wait_for_checkpoint_after(directory: Path, step: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paths = checkpoint_paths(directory)
        if paths and int(paths[-1].stem.split("-")[1]) > step:
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint after step {step} within {timeout} s")


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, reference):
    config = TrainConfig(**RESUME_SETTINGS, out_dir=str(tmp_path))
    directory = tmp_path / "checkpoints"
    command = [sys.executable, "-m", "tests.ddp_worker", "train", "--config", json.dumps(config.to_dict()),
               "--resume", "--noise-std", str(NOISY["noise_std"]), "--dropout", str(NOISY["dropout"]),
               "--step-delay", "0.05"]  # 0.1 s per step: 16 steps outlast both kills
    delays = [random.uniform(0.0, 0.3) for _ in range(2)]
    reached = 0
    for delay in delays:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        _wait_for_checkpoint_after(directory, reached, process)
        time.sleep(delay)
        process.kill()
        assert process.wait() == -signal.SIGKILL, f"the run ended before the kill (delays {delays})"
        process.stderr.close()
        checkpoints = [load_checkpoint(path) for path in checkpoint_paths(directory)]  # none is corrupt
        assert checkpoints and all(c.path.name == f"step-{c.step:08d}.safetensors" for c in checkpoints)
        reached = checkpoints[-1].step
    assert 0 < reached < 16
    task = toy_task(**NOISY)
    assert_same_run(task, train(task, config, resume=True), reference)


# ----------------------------------------------------------------------------- what is trained


def test_frozen_parameters_are_neither_optimised_nor_saved(tmp_path):
    task = toy_task()
    frozen_before = {name: p.clone() for name, p in task.model.encoder.named_parameters()}
    trainer = Trainer(task, TrainConfig(batch_size=8, max_steps=3, device="cpu", out_dir=str(tmp_path)), env=CPU)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in task.model.head.parameters()}
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert decay[id(task.model.head[0].weight)] == 0.01 and decay[id(task.model.head[1].weight)] == 0.0
    result = trainer.fit()
    for name, before in frozen_before.items():
        assert torch.equal(dict(task.model.encoder.named_parameters())[name], before)
    saved = load_checkpoint(result.checkpoint)
    assert set(saved.model_state()) == {f"head.{name}" for name, _ in task.model.head.named_parameters()}
    assert not any("encoder" in key for key in saved.tensors)

    half = toy_task()
    half.model.head[0].half()
    with pytest.raises(ValueError, match="head.0.weight is torch.float16"):
        Trainer(half, TrainConfig(batch_size=8, device="cpu"), env=CPU)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    grads = []
    for grad_accum in (1, 4):
        trainer = Trainer(toy_task(), TrainConfig(batch_size=8, grad_accum=grad_accum, device="cpu"), env=CPU)
        loss = trainer.accumulate_gradients(5)
        grads.append((loss, {name: p.grad.clone() for name, p in trainer.params.items()}))
    (loss_one, one), (loss_four, four) = grads
    assert loss_one.item() == pytest.approx(loss_four.item(), rel=1e-6)
    for name in one:
        torch.testing.assert_close(one[name], four[name], atol=1e-6, rtol=1e-5)


def test_evaluation_runs_in_eval_mode_every_n_steps(tmp_path):
    seen = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen.append((model.training, torch.is_grad_enabled()))
        return {"bias": model.head[-1].bias.item()}

    base = toy_task()
    task = TrainTask(model=base.model, dataset=base.dataset, collate_fn=base.collate_fn, loss_fn=base.loss_fn,
                     evaluate=evaluate)
    result = train(task, TrainConfig(batch_size=8, max_steps=5, eval_every=2, device="cpu", out_dir=str(tmp_path)))
    assert [entry["step"] for entry in result.evaluations] == [2, 4, 5]
    assert seen == [(False, False)] * 3 and task.model.training
    assert result.evaluations[-1]["bias"] == task.model.head[-1].bias.item()


def test_loss_fn_must_return_a_scalar(tmp_path):
    base = toy_task()
    task = TrainTask(model=base.model, dataset=base.dataset, collate_fn=base.collate_fn,
                     loss_fn=lambda model, batch: (model(batch["x"]) - batch["y"]) ** 2)
    with pytest.raises(ValueError, match="scalar tensor"):
        Trainer(task, TrainConfig(batch_size=8, device="cpu"), env=CPU).accumulate_gradients(0)


# ----------------------------------------------------------------------------- data parallel


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """Each rank takes 4 of the 8 samples (as 2 micro-batches of 2); DDP averages to the full-batch gradient."""
    config = TrainConfig(batch_size=8, grad_accum=2, max_steps=6, lr=1e-2, warmup_steps=1, grad_clip=0.5,
                         checkpoint_every=2, log_every=3, device="cpu", out_dir=str(tmp_path / "ddp"))
    port = _free_loopback_port()
    ranks = [subprocess.Popen(
        [sys.executable, "-m", "tests.ddp_worker", "ddp", "--config", json.dumps(config.to_dict()),
         "--results", str(tmp_path)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"})
        for rank in range(2)]
    for process in ranks:
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, output.decode()[-3000:]

    single = Trainer(toy_task(), config.replace(grad_accum=1, out_dir=str(tmp_path / "single")), env=CPU)
    single.accumulate_gradients(0)
    for rank in range(2):
        ddp_grads = load_file(tmp_path / f"grads-rank{rank}.safetensors")
        assert ddp_grads.keys() == single.params.keys()
        for name, param in single.params.items():
            torch.testing.assert_close(ddp_grads[name], param.grad, atol=1e-6, rtol=0)

    task = toy_task()
    result = train(task, config.replace(grad_accum=1, out_dir=str(tmp_path / "single-run")))
    rank0, rank1, resumed = (load_file(tmp_path / name) for name in (
        "weights-whole-rank0.safetensors", "weights-whole-rank1.safetensors", "weights-resumed-rank0.safetensors"))
    for name, value in trainable_state(task.model).items():
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks never drift apart
        assert torch.equal(rank0[name], resumed[name]), name  # DDP resumes exactly too
        torch.testing.assert_close(rank0[name], value, atol=1e-5, rtol=1e-5)
    ddp_history = json.loads((tmp_path / "history-whole-rank0.json").read_text())
    assert ddp_history == json.loads((tmp_path / "history-resumed-rank0.json").read_text())
    assert [entry["step"] for entry in ddp_history] == [3, 6]
    for ddp_entry, entry in zip(ddp_history, result.history, strict=True):
        assert ddp_entry["loss"] == pytest.approx(entry["loss"], rel=1e-5)
    assert [p.name for p in checkpoint_paths(tmp_path / "ddp-whole" / "checkpoints")] == [
        "step-00000002.safetensors", "step-00000004.safetensors", "step-00000006.safetensors"]  # rank 0 wrote them

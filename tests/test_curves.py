"""Training you can look at: curves.html beside history.json, TensorBoard scalars, and the missing-package error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.ddp_worker import toy_task
from training.curves import CURVES_FILE, TensorBoardUnavailableError
from training.loop import HISTORY_FILE, TrainConfig, train

# 64 samples / batch 8 = 8 steps; an entry per step; an evaluation at steps 4 and 8.
TINY = dict(seed=1, batch_size=8, epochs=1, lr=1e-2, warmup_steps=2, log_every=1, eval_every=4,
            checkpoint_every=2, device="cpu")


def plotted_traces(page: str) -> dict[str, dict]:
    """The traces of the first plotly figure in an HTML page, by name, as the page hands them to Plotly."""
    decoder = json.JSONDecoder()
    at = page.index("Plotly.newPlot(") + len("Plotly.newPlot(")
    _, at = decoder.raw_decode(page, page.index('"', at))  # the div id
    traces, _ = decoder.raw_decode(page, page.index("[", at))
    return {trace["name"]: trace for trace in traces}


def evaluated_task():
    task = toy_task()
    task.evaluate = lambda model: {"weight_norm": float(model.head[0].weight.norm())}
    return task


def test_a_run_draws_its_loss_lr_and_evaluations_beside_its_history(tmp_path, one_thread):
    result = train(evaluated_task(), TrainConfig(**TINY, out_dir=str(tmp_path)))
    history = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert history["train"] == result.history and len(result.history) == 8
    traces = plotted_traces((tmp_path / CURVES_FILE).read_text(encoding="utf-8"))

    steps = [entry["step"] for entry in result.history]
    assert steps == list(range(1, 9))
    for name, key in (("training loss", "loss"), ("learning rate", "lr"), ("gradient norm", "grad_norm")):
        assert traces[name]["x"] == steps
        assert traces[name]["y"] == [entry[key] for entry in result.history]  # JSON keeps every float exact
    assert traces["learning rate"]["y"][:2] == pytest.approx([0.005, 0.01])  # warmup: lr * (i + 1) / 2
    assert traces["weight_norm"]["x"] == [4, 8]
    assert traces["weight_norm"]["y"] == [entry["weight_norm"] for entry in result.evaluations]


def test_missing_tensorboard_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` finds without tensorboard
    config = TrainConfig(**TINY, out_dir=str(tmp_path / "run"), tensorboard_dir=str(tmp_path / "tb"))
    with pytest.raises(TensorBoardUnavailableError) as missing:
        train(toy_task(), config)
    message = str(missing.value)
    assert "\n" not in message and "pip install 'capdemo[tensorboard]'" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_tensorboard_scalars_are_the_history_once_each_after_a_resume(tmp_path, one_thread):
    pytest.importorskip("tensorboard")  # the capdemo[tensorboard] extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(**TINY, out_dir=str(tmp_path / "run"), tensorboard_dir=str(tmp_path / "tb"))
    train(evaluated_task(), config, stop_after=5)  # killed after step 5; the newest checkpoint is step 4
    result = train(evaluated_task(), config, resume=True)

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        logged = events.Scalars(f"train/{key}")
        assert [event.step for event in logged] == [entry["step"] for entry in result.history]  # step 5 once
        assert [event.value for event in logged] == pytest.approx([entry[key] for entry in result.history], rel=1e-6)
    evaluated = events.Scalars("eval/weight_norm")
    assert [(e.step, e.value) for e in evaluated] == [
        (entry["step"], pytest.approx(entry["weight_norm"], rel=1e-6)) for entry in result.evaluations]


def test_curves_file_is_written_when_a_run_stops_early(tmp_path, one_thread):
    train(toy_task(), TrainConfig(**TINY, out_dir=str(tmp_path)), stop_after=3)
    traces = plotted_traces((tmp_path / CURVES_FILE).read_text(encoding="utf-8"))
    assert traces["training loss"]["x"] == [1, 2, 3]
    assert not [path for path in Path(tmp_path).iterdir() if path.name.endswith(".tmp")]

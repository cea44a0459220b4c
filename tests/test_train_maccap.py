"""MacCap training: a tiny model learns to reconstruct ~200 captions; CLI, bundle, resume and DDP."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from capdemo.bundle import Bundle
from capdemo.encoders import encoder_from_bundle
from capdemo.lm import save_causal_lm
from capdemo.methods.maccap.model import MacCapAdaptor, MacCapConfig, caption_text_embeddings, load_from_bundle
from capdemo.methods.maccap.inference import MacCapOptions, caption_images
from capdemo.vqa import AnswerList
from training.checkpoints import checkpoint_paths, latest_checkpoint
from training.loop import TrainConfig
from training.maccap import TRAINING_RECORD, main, train_maccap
from tests.kill_resume import (
    MID_WRITE, assert_same_tensors, differs, final_checkpoint_tensors, kill_during_training, temp_files,
    write_checkpoint_as_step,
)
from capdemo.testing import tiny_encoder_config, tiny_gpt2, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "blue", "green", "yellow", "white", "purple"]
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "medium", "large"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom"]


def shape_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions "a <size> <colour> <shape> <place>" (216 exist)."""
    captions = [f"a {s} {c} {sh} {p}" for s, c, sh, p in itertools.product(SIZES, COLOURS, SHAPES, PLACES)]
    random.Random(seed).shuffle(captions)
    return captions[:count]


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_tiny_model_reconstructs_200_captions_from_their_text_embeddings(tiny_encoder, tmp_path):
    """The quality bar of text-only training: caption <- its own CLIP text embedding, >= 90 % exact.

    LM trained with the adaptor (the set-up that works for a tiny LM, see MacCapConfig.train_lm);
    noise variance 1e-3 because the random tiny CLIP's text space is crowded (nearest other caption at
    cosine ~0.96, while variance 0.016 in 32 dimensions would put a noisy copy at cosine ~0.7).
    """
    captions = shape_captions(200)
    tokenizer = tiny_tokenizer(captions, vocab_size=600)
    config = MacCapConfig(lm="unused", n_cr=4, n_query=4, heads=4, ffn_dim=128, mlp_layers=2, dropout=0.0,
                          memory_layernorm=True, train_lm=True, noise_variance=1e-3, max_new_tokens=16)
    train_config = TrainConfig(out_dir=str(tmp_path / "run"), batch_size=32, max_steps=400, lr=3e-3,
                               warmup_steps=20, checkpoint_every=0, log_every=50)
    run = train_maccap(
        captions, encoder=tiny_encoder, encoder_config=tiny_encoder_config(), config=config,
        train_config=train_config, out=tmp_path / "bundle", lm=without_dropout(tiny_gpt2(tokenizer)),
        tokenizer=tokenizer, eval_captions=200,
    )
    assert run.result.history[-1]["loss"] < run.result.history[0]["loss"] / 10
    assert run.result.evaluations[-1]["text_to_text_exact"] >= 0.9
    # the bundle alone rebuilds the model, and it gives the same reconstructions
    bundle = Bundle.load(run.bundle)
    model, encoder = load_from_bundle(bundle), encoder_from_bundle(bundle)
    decoded = caption_text_embeddings(model, encoder.encode_text(captions), beams=1)
    exact = sum(d == c for d, c in zip(decoded, captions)) / len(captions)
    assert exact == pytest.approx(run.result.evaluations[-1]["text_to_text_exact"], abs=0.02)
    assert exact >= 0.9


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, tiny_encoder) -> dict[str, Path]:
    """A corpus file, an encoder config with its weights, and an LM folder: what `python -m training maccap` reads."""
    root = tmp_path_factory.mktemp("maccap-cli")
    captions = shape_captions(40, seed=1)
    (root / "corpus.txt").write_text("\n".join(captions + ["a caption that is far too long to keep " * 3]) + "\n")
    save_file(tiny_encoder.model.state_dict(), root / "clip.safetensors")
    tiny_encoder_config(pretrained=str(root / "clip.safetensors")).save_json(root / "encoder.json")
    tokenizer = tiny_tokenizer(captions)
    save_causal_lm(tiny_gpt2(tokenizer), tokenizer, root / "lm")
    return {"root": root, "corpus": root / "corpus.txt", "encoder": root / "encoder.json", "lm": root / "lm"}


def cli_args(inputs: dict[str, Path], name: str, *extra: str) -> list[str]:
    root = inputs["root"]
    return [
        "--corpus", str(inputs["corpus"]), "--encoder", str(inputs["encoder"]), "--lm", str(inputs["lm"]),
        "--out", str(root / name / "bundle"), "--run-dir", str(root / name / "run"),
        "--embeddings", str(root / "embeddings"), "--n-cr", "4", "--n-query", "4", "--heads", "4", "--ffn-dim", "64",
        "--mlp-layers", "2", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--device", "cpu",
        "--eval-captions", "2", "--checkpoint-every", "2", *extra,
    ]


def adaptor_weights(bundle_dir: Path) -> dict[str, torch.Tensor]:
    return Bundle.load(bundle_dir).tensors("maccap/adaptor.safetensors")


def test_cli_writes_a_bundle_that_capdemo_serves(cli_inputs, capsys):
    answers = ["yes", "no", "red", "two"]
    answer_file = cli_inputs["root"] / "answers.json"
    openvqa_format = [{a: i for i, a in enumerate(answers)}, {str(i): a for i, a in enumerate(answers)}]
    answer_file.write_text(json.dumps(openvqa_format))
    assert main(cli_args(cli_inputs, "plain", "--steps", "3", "--vqa-answers", str(answer_file))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bundle = Bundle.load(summary["bundle"])
    assert summary["steps"] == 3 and set(bundle.components) >= {"encoder", "maccap", "vqa"}
    assert AnswerList.from_bundle(bundle).answers == answers
    config = MacCapConfig.from_dict(bundle.component("maccap"))
    assert (config.n_cr, config.embed_dim, config.lm_embed_dim, config.lm) == (4, 32, 64, "bundle:maccap/lm")
    record = bundle.json("maccap/training.json")
    assert record["captions"] == 40 and len(record["history"]) >= 1  # the over-long caption was filtered out
    encoder = encoder_from_bundle(bundle)
    result = caption_images(load_from_bundle(bundle), encoder, encoder.encode_images(torch.randn(1, 3, 32, 32)),
                            MacCapOptions(samples=3, beams=2, n_cr=4, max_new_tokens=4))[0]
    assert len(result.candidates) == 3


def test_killed_then_resumed_run_ends_with_the_same_weights(cli_inputs):
    main(cli_args(cli_inputs, "whole", "--steps", "5", "--train-lm"))
    assert main(cli_args(cli_inputs, "split", "--steps", "5", "--train-lm", "--stop-after", "3")) == 0
    assert not (cli_inputs["root"] / "split" / "bundle").exists()  # an unfinished run writes no bundle
    main(cli_args(cli_inputs, "split", "--steps", "5", "--train-lm", "--resume"))
    whole, split = cli_inputs["root"] / "whole" / "bundle", cli_inputs["root"] / "split" / "bundle"
    for name, tensor in adaptor_weights(whole).items():
        assert torch.equal(tensor, adaptor_weights(split)[name]), name
    lm_whole = Bundle.load(whole).tensors("maccap/lm/model.safetensors")
    lm_split = Bundle.load(split).tensors("maccap/lm/model.safetensors")
    assert all(torch.equal(lm_whole[k], lm_split[k]) for k in lm_whole)


def test_sigkilled_cli_runs_resume_to_the_weights_of_an_uninterrupted_run(cli_inputs, one_thread):
    """`python -m training maccap` SIGKILLed twice (a seeded random delay after a checkpoint, then just as a
    checkpoint write begins) and resumed by the same command ends bit-identical to a run never killed."""
    steps = 30  # 6 epochs of 5 steps; a checkpoint every step, so a kill often lands in a write
    extra = ("--steps", str(steps), "--train-lm", "--checkpoint-every", "1")  # LM dropout and noise draw every step
    root = cli_inputs["root"]
    main(cli_args(cli_inputs, "sigkill-whole", *extra))
    plans = [random.Random(8).uniform(0.0, 0.3), MID_WRITE]
    command = ["-m", "training", "maccap", *cli_args(cli_inputs, "sigkill", *extra, "--resume")]
    kills = kill_during_training(command, root / "sigkill" / "run" / "checkpoints", plans, total_steps=steps)
    assert not (root / "sigkill" / "bundle").exists()
    assert main(cli_args(cli_inputs, "sigkill", *extra, "--resume")) == 0

    whole, resumed = root / "sigkill-whole", root / "sigkill"
    assert_same_tensors(adaptor_weights(resumed / "bundle"), adaptor_weights(whole / "bundle"), f"adaptor {kills}")
    lm = "maccap/lm/model.safetensors"
    assert_same_tensors(Bundle.load(resumed / "bundle").tensors(lm), Bundle.load(whole / "bundle").tensors(lm), "LM")
    reference = final_checkpoint_tensors(whole / "run")
    assert any(key.endswith("/exp_avg_sq") for key in reference)
    assert_same_tensors(final_checkpoint_tensors(resumed / "run"), reference, "final checkpoint (weights and AdamW)")
    for key in ("history", "evaluations"):  # the loss sums of intervals cut by a kill survive too
        assert Bundle.load(resumed / "bundle").json(TRAINING_RECORD)[key] == Bundle.load(whole / "bundle").json(
            TRAINING_RECORD)[key]
    assert not temp_files(resumed / "run" / "checkpoints")  # a killed writer's leftovers are cleared
    assert [p.name for p in checkpoint_paths(resumed / "run" / "checkpoints")][-1] == f"step-{steps:08d}.safetensors"

    # The comparison can fail: resuming the first kill's checkpoint as if it were one step earlier ends elsewhere.
    first = kills[0].checkpoints[-1]
    write_checkpoint_as_step(first, root / "sigkill-wrong" / "run" / "checkpoints", first.step - 1)
    assert main(cli_args(cli_inputs, "sigkill-wrong", *extra, "--resume")) == 0
    assert differs(adaptor_weights(root / "sigkill-wrong" / "bundle"), adaptor_weights(whole / "bundle"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(cli_inputs):
    """Noise and dropout off, so both runs compute the same mean gradient over each global batch of 8."""
    deterministic = ("--steps", "3", "--noise-variance", "0", "--dropout", "0")
    main(cli_args(cli_inputs, "single", *deterministic))
    port, processes = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "training", "maccap", *cli_args(cli_inputs, "ddp", *deterministic)]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()[-2000:]
    assert latest_checkpoint(cli_inputs["root"] / "ddp" / "run" / "checkpoints").state["world_size"] == 2
    single = adaptor_weights(cli_inputs["root"] / "single" / "bundle")
    ddp = adaptor_weights(cli_inputs["root"] / "ddp" / "bundle")
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    torch.manual_seed(0)  # the adaptor's initialisation (--seed 0): training must have moved it
    trained_config = Bundle.load(cli_inputs["root"] / "single" / "bundle").component("maccap")
    initial = MacCapAdaptor(MacCapConfig.from_dict(trained_config))
    assert any((single[name] - value).abs().max() > 1e-4 for name, value in initial.state_dict().items())


def test_run_identity_names_what_a_resume_must_share():
    """Model settings and the exact corpus are part of a run's identity; where the LM lives is not."""
    from training.maccap import run_identity

    config, captions = MacCapConfig(), ["a red circle.", "two blue squares."]
    base = run_identity(config, captions)
    assert run_identity(config.replace(lm="/elsewhere/opt"), captions) == base
    changed = run_identity(config.replace(noise_variance=0.1), captions)
    assert {k for k in base if base[k] != changed[k]} == {"maccap.noise_variance"}
    reordered = run_identity(config, captions[::-1])
    assert {k for k in base if base[k] != reordered[k]} == {"corpus_sha256"}


@pytest.mark.parametrize(("training", "inference"), [
    (["--text-copies", "1"], {"region_mode": "subregion", "samples": 3}),  # single token
    (["--noise-variance", "0"], {"region_mode": "cls", "samples": 3}),  # no training noise; CLS token at inference
    ([], {"region_mode": "subregion", "samples": 1}),  # multiple token + noise; without sampling and filtering
])
def test_every_table_5_row_runs_from_flags(cli_inputs, capsys, training, inference):
    """MacCap's Table 5: the training rows are `python -m training maccap` flags, the inference rows capdemo's."""
    from capdemo.pipeline import Captioner

    name = "table5-" + "-".join(training).strip("-").replace("--", "") or "table5-default"
    assert main(cli_args(cli_inputs, name, "--steps", "2", *training)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = MacCapConfig.from_dict(Bundle.load(summary["bundle"]).component("maccap"))
    assert (config.text_copies == 1) == ("--text-copies" in training)
    assert (config.noise_variance == 0) == ("--noise-variance" in training)
    captioner = Captioner.from_bundle(summary["bundle"], device="cpu")
    result = captioner.caption([torch.rand(32, 32, 3).mul(255).byte().numpy()], "maccap", **inference)[0]
    assert result.extras["region_mode"] == inference["region_mode"] and len(result.candidates) == inference["samples"]

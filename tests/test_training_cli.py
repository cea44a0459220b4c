"""The shared training command line: every method's flags, defaults shown, run folders that never collide."""

from __future__ import annotations

import pytest
import torch

from training import capdec, maccap, tomcap
from training.__main__ import SUBCOMMANDS
from training.__main__ import main as training_main
from training.cli import run_dir_of, train_config_from_arguments
from training.embed import StaleCacheError, cached_text_embeddings

METHOD_COMMANDS = {"maccap": maccap, "tomcap": tomcap, "capdec": capdec}
REQUIRED = {"maccap": [], "tomcap": ["--datastore", "store/"], "capdec": []}


@pytest.mark.parametrize("name", list(METHOD_COMMANDS))
def test_every_method_command_shares_the_flags_and_shows_its_defaults(name, capsys):
    parser = METHOD_COMMANDS[name].build_parser()
    args = parser.parse_args(["--corpus", "c.txt", "--out", "weights/x", *REQUIRED[name]])
    shared = {"corpus", "out", "name", "encoder", "lm", "config", "run_dir", "embeddings", "steps", "epochs",
              "batch_size", "lr", "warmup", "min_lr_ratio", "seed", "resume", "tensorboard", "dedupe"}
    assert shared <= set(vars(args))
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "(default: " in shown and "--tensorboard DIR" in shown
    assert train_config_from_arguments(args, name).out_dir == f"runs/x/{name}"


def test_maccap_defaults_follow_the_reference_codes_coco_run():
    args = maccap.build_parser().parse_args(["--corpus", "c.txt", "--out", "weights/x"])
    config = train_config_from_arguments(args, "maccap")
    assert (config.epochs, config.batch_size, config.lr, config.min_lr_ratio, config.warmup_steps) == (8, 128, 4e-4,
                                                                                                       0.1, 50)


def test_two_methods_in_one_bundle_keep_apart_their_run_folders_and_caches(tmp_path):
    """MacCap filters its corpus (<= 15 words), TOMCap does not: one shared default cache would hold the wrong
    captions for one of them; by default each writes under runs/<bundle>/<method>."""
    args = maccap.build_parser().parse_args(["--corpus", "c.txt", "--out", "weights/both"])
    assert run_dir_of(args, "maccap") != run_dir_of(args, "tomcap")

    class Encoder:
        name, embed_dim = "stand-in", 4

        def encode_text(self, texts):
            return torch.ones(len(texts), 4)

    cached_text_embeddings(["a", "b"], Encoder(), tmp_path / "cache")
    with pytest.raises(StaleCacheError, match="pass another --embeddings folder"):  # a flag the command has
        cached_text_embeddings(["a", "b", "c"], Encoder(), tmp_path / "cache")


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommands_help_shows_its_defaults(name, capsys):
    """A reader reproducing a paper sees every default in ``--help`` (issue #14: "every subcommand")."""
    with pytest.raises(SystemExit) as exit_info:
        training_main([name, "--help"])
    assert exit_info.value.code == 0
    assert "(default: " in capsys.readouterr().out, f"python -m training {name} --help shows no defaults"

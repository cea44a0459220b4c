"""``python -m training shapes-clip``: the recipe's CLIP with changed settings, trained and measured."""

import json

import pytest

from capdemo.config import ConfigError
from training.shapes.build import ShapesRecipe
from training.shapes.clip_levers import changed_clip, parse_settings


def test_settings_parse_as_json_values_and_reach_the_config():
    settings = parse_settings(["embed_dim=512", "mismatched=0.03", "vision_pool=tok"], "--set")
    assert settings == {"embed_dim": 512, "mismatched": 0.03, "vision_pool": "tok"}
    base = ShapesRecipe.full().clip
    config = changed_clip(base, settings, parse_settings(["batch_size=64"], "--train-set"), out_dir="runs/x")
    assert (config.embed_dim, config.mismatched, config.vision_pool) == (512, 0.03, "tok")
    assert (config.train.batch_size, config.train.epochs, config.train.out_dir) == (64, base.train.epochs, "runs/x")
    assert config.logit_scale == base.logit_scale  # everything not named stays the recipe's


@pytest.mark.parametrize("settings, train_settings, message", [
    (["embed_dims=512"], [], r"shapes-clip --set: unknown field\(s\) embed_dims"),
    ([], ["batchsize=64"], r"shapes-clip --train-set: unknown field\(s\) batchsize"),  # the flag that named it
    (["mismatched=1.5"], [], "mismatched must be a fraction"),
])
def test_a_bad_setting_is_a_one_line_error_naming_it(settings, train_settings, message):
    with pytest.raises(ConfigError, match=message):
        changed_clip(ShapesRecipe.full().clip, parse_settings(settings, "--set"),
                     parse_settings(train_settings, "--train-set"), out_dir="runs/x")
    with pytest.raises(ConfigError, match="expected field=value"):
        parse_settings(["embed_dim"], "--set")


def test_the_command_trains_with_the_changed_settings_and_reports_the_gap(tmp_path, capsys):
    from training.__main__ import main

    code = main(["shapes-clip", "--smoke", "--set", "threads=1", "--train-set", "max_steps=6",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 6  # --train-set reached the training loop
    assert 0.0 <= report["i2t"] <= 1.0 and 0.0 <= report["mean_distance"] <= 2.0
    assert -1.0 <= report["paired_cosine"] <= 1.0 and 0.5 <= report["probe_accuracy"] <= 1.0
    assert main(["shapes-clip", "--smoke", "--set", "embed_dims=8"]) == 1  # one-line error, no traceback
    assert "unknown field(s) embed_dims" in capsys.readouterr().err


def test_untrained_measures_the_initialisation_which_retrieves_nothing_and_has_a_wider_gap(tmp_path, capsys):
    from training.__main__ import main

    assert main(["shapes-clip", "--smoke", "--set", "threads=1", "--untrained", "--run-dir", str(tmp_path)]) == 0
    untrained = json.loads(capsys.readouterr().out)
    assert untrained["steps"] == 0 and not any(tmp_path.iterdir())  # nothing trained, nothing written
    assert untrained["i2t"] < 0.05  # chance among 1,000 held-out pairs, with repeated scenes: a random CLIP
    assert main(["shapes-clip", "--smoke", "--set", "threads=1", "--run-dir", str(tmp_path / "run")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["i2t"] > untrained["i2t"] + 0.05  # the smoke CLIP: 0.09 against 0.002 on 2026-12-03
    assert untrained["mean_distance"] > trained["mean_distance"]  # training narrows the gap it starts from

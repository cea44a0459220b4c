"""Novel compositions: scenes left out of every training text, and the evaluation that scores them alone."""

from __future__ import annotations

import collections

import pytest

from capdemo.config import ConfigError
from training.shapes import world
from training.shapes.build import ShapesRecipe, write_world_data
from training.shapes.evaluate import held_out_pairs
from training.shapes.language import parse_caption

NOVEL = world.WorldConfig(novel=0.2)


def test_novel_scenes_are_a_fixed_fifth_of_each_kind_whose_words_the_rest_still_use():
    chosen = world.novel_scenes(NOVEL)
    every = collections.Counter(scene.kind for scene in world.all_scenes(NOVEL))  # 180 singles, 612 pairs, 54 groups
    assert collections.Counter(scene.kind for scene in chosen) == {kind: round(0.2 * n) for kind, n in every.items()}
    assert world.novel_scenes(world.WorldConfig(novel=0.2)) == chosen  # a fixed draw
    assert world.novel_scenes(NOVEL.replace(novel_seed=6)) != chosen
    assert world.novel_scenes(world.WorldConfig()) == frozenset()
    rest = [scene for scene in world.all_scenes(NOVEL) if scene not in chosen]
    assert {word for scene in rest for text in world.captions(scene) for word in text.split()} == set(
        world.vocabulary(NOVEL))
    with pytest.raises(ConfigError, match="novel"):
        world.WorldConfig(novel=1.0)


def test_the_corpus_leaves_the_novel_scenes_out_and_is_unchanged_without_them(tmp_path):
    smoke = ShapesRecipe.smoke()
    plain = write_world_data(smoke, tmp_path / "plain")["corpus"].read_text().splitlines()
    assert plain == world.generate_captions(smoke.corpus_captions, seed=smoke.world.text_seed, config=smoke.world)
    held = write_world_data(smoke.replace(world=smoke.world.replace(novel=0.2)), tmp_path / "novel")
    corpus = held["corpus"].read_text().splitlines()
    chosen = world.novel_scenes(smoke.world.replace(novel=0.2))
    assert not {parse_caption(text) for text in corpus} & chosen
    assert corpus == [text for text in plain if parse_caption(text) not in chosen]  # the same draws, filtered
    assert 0.7 < len(corpus) / len(plain) < 0.9  # novel pair scenes are most of the world's


def test_the_lms_question_answer_text_leaves_the_novel_scenes_out(monkeypatch, tmp_path):
    from training.shapes import build

    asked_about = {}

    def qa_texts(scenes, rng, **kwargs):
        asked_about["scenes"] = scenes
        return []

    monkeypatch.setattr(build, "qa_texts", qa_texts)
    monkeypatch.setattr(build, "pretrain_lm", lambda texts, config, train_config, aligned_texts: None)
    smoke = ShapesRecipe.smoke()
    recipe = smoke.replace(world=smoke.world.replace(novel=0.2))
    corpus = write_world_data(recipe, tmp_path)["corpus"]
    build.pretrain_shapes_lm(recipe, corpus, run_dir=tmp_path / "lm")
    chosen = world.novel_scenes(recipe.world)
    assert asked_about["scenes"] and not set(asked_about["scenes"]) & chosen
    build.pretrain_shapes_lm(smoke, corpus, run_dir=tmp_path / "lm")
    assert set(asked_about["scenes"]) & chosen  # without the split, the same draws ask about them


def test_held_out_novel_pairs_show_only_novel_scenes():
    pairs = held_out_pairs(300, seed=1234, config=NOVEL, novel=True)
    chosen = world.novel_scenes(NOVEL)
    assert len(pairs) == 300 and all(scene in chosen for scene, *_ in pairs)
    everything = held_out_pairs(300, seed=1234, config=NOVEL)
    assert sum(scene in chosen for scene, *_ in everything) < 120  # about a fifth
    with pytest.raises(ValueError, match="leaves no scene out"):
        held_out_pairs(10, seed=1234, config=world.WorldConfig(), novel=True)


def test_world_set_makes_a_trial_recipe_the_build_and_the_ablation_share(monkeypatch, tmp_path, capsys):
    from training.shapes import ablate
    from training.shapes import build as build_module

    built = {}
    monkeypatch.setattr(build_module, "build", lambda recipe, out, work, **kw: built.update(recipe=recipe, **kw))
    assert build_module.main(["--smoke", "--world-set", "novel=0.2", "--work-dir", str(tmp_path),
                              "--out", str(tmp_path)]) == 0
    assert built["recipe"].world == ShapesRecipe.smoke().world.replace(novel=0.2)
    assert built["command"] == "python -m training shapes --world-set novel=0.2"
    seen = {}

    def run_variant(variant, *, recipe, novel, **kw):
        seen.update(world=recipe.world, novel=novel)
        return {"group": variant.group, "description": variant.description, **{k: 0.5 for k in ablate.REPORTED}}

    monkeypatch.setattr(ablate.StageOutputs, "require_finished", lambda self: None)
    monkeypatch.setattr(ablate, "run_variant", run_variant)
    assert ablate.main(["--smoke", "--world-set", "novel=0.2", "--novel", "--work-dir", str(tmp_path),
                        "--only", "gap-none", "--json"]) == 0
    assert seen == {"world": built["recipe"].world, "novel": True}
    capsys.readouterr()
    from training.__main__ import main

    assert main(["shapes", "--smoke", "--world-set", "novle=0.2", "--out", str(tmp_path)]) == 1
    assert "--world-set: unknown field(s) novle" in capsys.readouterr().err

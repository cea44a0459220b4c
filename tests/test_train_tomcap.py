"""TOMCap training: cached self-excluding retrieval, examples, a tiny model that learns, the CLI and its bundle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from capdemo.bundle import Bundle
from capdemo.encoders import EncoderConfig, encoder_from_bundle
from capdemo.gap import GapStats
from capdemo.retrieval import CaptionDatastore
from capdemo.lm import IGNORE_INDEX
from capdemo.methods.base import options_from_config
from capdemo.methods.tomcap.inference import TOMCapOptions, caption_images, datastore_from_bundle, load_from_bundle
from capdemo.methods.tomcap.model import TOMCapConfig
from tests.kill_resume import (
    MID_WRITE, assert_same_tensors, differs, final_checkpoint_tensors, kill_during_training, temp_files,
    write_checkpoint_as_step,
)
from tests.test_tomcap import EMBED_DIM, bag_of_words_embedder, build_model, save_tiny_lm, shapes_captions
from capdemo.testing import TINY_CORPUS, tiny_encoder_config
from training.checkpoints import checkpoint_paths
from training.loop import TrainConfig, train
from training.tomcap import (
    RETRIEVAL_CACHE, TRAINING_RECORD, build_task, collate, main, prepare_examples, reproduce_targets,
    retrieve_for_training, store_caption_embeddings, training_queries,
)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], torch.Tensor, CaptionDatastore, object]:
    """The 200 shapes captions, their bag-of-words embeddings (N, D), a store of them, and the embedder."""
    captions = shapes_captions()
    embed = bag_of_words_embedder(captions)
    embeds = embed(captions)
    return captions, embeds, CaptionDatastore.build(embeds, captions, encoder_name="bag-of-words"), embed


@pytest.fixture(scope="module")
def shapes_lm(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("shapes-lm"), shapes_captions(), output_gain=16.0)


def test_retrieval_leaves_out_the_caption_itself_and_its_duplicates(tmp_path):
    captions = ["a red circle", "a red circle", "a blue circle", "a red square", "a blue square", "a green star"]
    embed = bag_of_words_embedder(captions)
    store = CaptionDatastore.build(embed(captions), captions, encoder_name="bag-of-words")
    cache = tmp_path / RETRIEVAL_CACHE
    ids = retrieve_for_training(store, embed(captions), captions, 3, cache_file=cache, progress=False)
    assert ids.shape == (6, 3)
    for row, caption in enumerate(captions):
        texts = [store.captions[i] for i in ids[row]]
        assert caption not in texts and len(set(texts)) == 3  # never itself (nor its copy), no repeats
        scores = (embed(texts) @ embed([caption])[0]).tolist()
        others = [c for c in set(captions) if c != caption]
        best = max(others, key=lambda c: float(embed([c])[0] @ embed([caption])[0]))
        assert scores == sorted(scores, reverse=True) and texts[0] == best  # the target is the nearest other caption

    def no_search(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    store.search = no_search  # same corpus, store and hit count: read from the cache
    np.testing.assert_array_equal(retrieve_for_training(store, embed(captions), captions, 3, cache_file=cache), ids)
    with pytest.raises(AssertionError, match="cache should have answered"):  # another hit count is recomputed
        retrieve_for_training(store, embed(captions), captions, 2, cache_file=cache)
    with pytest.raises(ValueError, match="holds 6 captions; .* needs more than 6"):
        retrieve_for_training(CaptionDatastore.build(embed(captions), captions, encoder_name="x"), embed(captions),
                              captions, 6)


def test_training_queries_are_the_corrected_embedding_noised_in_units_of_the_image_spread():
    """query_noise_scale x sigma_I per dimension, one seeded draw, no re-normalisation (image-like queries)."""
    generator = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(4000, 8, generator=generator), dim=-1)
    images = torch.randn(500, 8, generator=generator) * torch.linspace(0.1, 0.8, 8) + 0.3
    stats = GapStats.compute(images, texts)
    corrected = stats.correct(texts, "mean_std")
    clean = training_queries(TOMCapConfig(query_noise_scale=0.0), texts, stats, seed=3)
    torch.testing.assert_close(clean, corrected)
    noisy = training_queries(TOMCapConfig(query_noise_scale=0.5), texts, stats, seed=3)
    spread = (noisy - corrected).std(dim=0, correction=0)  # (D,)
    torch.testing.assert_close(spread, 0.5 * stats.sigma_image, rtol=0.05, atol=1e-2)
    assert not torch.allclose(noisy.norm(dim=-1), torch.ones(4000), atol=0.05)  # not projected back on the sphere
    torch.testing.assert_close(training_queries(TOMCapConfig(query_noise_scale=0.5), texts, stats, seed=3), noisy)
    separate = TOMCapConfig(query_noise_scale=0.5, retrieval_encoder=EncoderConfig(model_name="another"))
    own = training_queries(separate, texts, stats, seed=3)  # another model's space: its own text spread
    torch.testing.assert_close((own - texts).std(dim=0, correction=0), 0.5 * texts.std(dim=0, correction=0),
                               rtol=0.05, atol=1e-2)


def test_store_captions_outside_the_corpus_are_embedded_once(corpus):
    captions, embeds, _, embed = corpus
    extra = ["a small red circle", "a large blue star"]
    store = CaptionDatastore.build(embed(captions[:5] + extra), captions[:5] + extra, encoder_name="bag-of-words")
    asked: list[list[str]] = []

    def recording_embed(texts: list[str]) -> torch.Tensor:
        asked.append(list(texts))
        return embed(texts)

    store_ids = np.array([[0, 5], [6, 5], [2, 3]])
    table, rows = store_caption_embeddings(store_ids, store, captions, embeds, recording_embed)
    assert asked == [extra]  # corpus captions reuse their embedding; the two others are embedded together
    for r, c in np.ndindex(store_ids.shape):
        torch.testing.assert_close(table[rows[r, c]], embed([store.captions[store_ids[r, c]]])[0])


def test_examples_hold_corrected_input_neighbour_memory_and_target_tokens(lm_dir_for_examples, corpus):
    captions, embeds, store, embed = corpus
    gap_stats = GapStats.compute(torch.randn(50, EMBED_DIM) * 0.2 + 0.1, embeds)
    model = build_model(lm_dir_for_examples, k=3)
    examples = prepare_examples(model, captions, embeds, store, embed, gap_stats=gap_stats, progress=False)
    queries = training_queries(model.config, embeds, gap_stats, seed=0)  # corrected and noised, seeded
    hits = retrieve_for_training(store, queries, captions, 4, progress=False)
    for index in (0, 57, 199):
        item = examples[index]
        target, neighbours, _ = examples.parts(index)
        assert target == store.captions[hits[index, 0]] and target != captions[index]  # the nearest, not the input
        assert neighbours == [store.captions[i] for i in hits[index, 1:]] and target not in neighbours
        torch.testing.assert_close(item["input_embeds"], gap_stats.correct(embeds[index], "mean_std"))
        torch.testing.assert_close(item["neighbour_embeds"], embed(neighbours))
        assert item["input_ids"].tolist() == model.tokens.training_tokens(neighbours, target)[0]
        assert item["labels"].tolist() == model.tokens.training_tokens(neighbours, target)[1]
    batch = collate(model.pad_id)([examples[0], examples[1]])
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all() and (batch["input_ids"][padded] == model.pad_id).all()
    assert batch["neighbour_embeds"].shape == (2, 3, EMBED_DIM)

    in_prompt = prepare_examples(build_model(lm_dir_for_examples, k=3, target_in_prompt=True), captions, embeds, store,
                                 embed, gap_stats=gap_stats, progress=False)
    target, neighbours, _ = in_prompt.parts(57)
    assert neighbours[0] == target == examples.parts(57)[0]
    with pytest.raises(ValueError, match="needs gap statistics"):
        prepare_examples(model, captions, embeds, store, embed, gap_stats=None, progress=False)
    with pytest.raises(ValueError, match="lower --k or --max-caption-tokens"):  # before any step, not at one
        prepare_examples(build_model(lm_dir_for_examples, k=20), captions, embeds, store,
                         embed, gap_stats=gap_stats, progress=False)

    ablation = build_model(lm_dir_for_examples, use_retrieval=False, target="input", gap_correction="none")
    plain = prepare_examples(ablation, captions, embeds, store, embed, gap_stats=None, progress=False)
    item = plain[57]
    assert plain.parts(57)[:2] == (captions[57], []) and item["neighbour_embeds"].shape == (0, EMBED_DIM)
    assert item["input_ids"].tolist() == ablation.tokens.training_tokens([], captions[57])[0]
    torch.testing.assert_close(item["input_embeds"], embeds[57])


@pytest.fixture(scope="module")
def lm_dir_for_examples(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("examples-lm"), shapes_captions())


def test_tiny_tomcap_reproduces_its_targets_text_to_text(shapes_lm, corpus, tmp_path):
    captions, embeds, store, embed = corpus
    model = build_model(shapes_lm, k=2, gap_correction="none", noise_variance=0.0, max_new_tokens=12)
    examples = prepare_examples(model, captions, embeds, store, embed, gap_stats=None, progress=False)
    before, _ = reproduce_targets(model, examples, range(len(examples)))
    config = TrainConfig(out_dir=str(tmp_path / "run"), batch_size=32, max_steps=400, lr=5e-3, warmup_steps=20,
                         checkpoint_every=0, log_every=100)
    result = train(build_task(model, examples), config)
    after, outputs = reproduce_targets(model, examples, range(len(examples)))
    assert before == 0.0 and after >= 0.9, (after, outputs[:5])
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]


def test_cli_trains_resumes_and_writes_a_bundle_that_captions(tmp_path, lm_dir_for_examples):
    """`python -m training tomcap` on a tiny CLIP: killed after one step, resumed, bundled, reloaded."""
    from capdemo.testing import tiny_encoder as build_encoder

    captions = TINY_CORPUS + ["a blue circle on the left", "two red squares", "a yellow star at the top",
                              "a white triangle on the right"]
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(captions) + "\n")
    encoder_json = tmp_path / "encoder.json"
    tiny_encoder_config().save_json(encoder_json)
    encoder = build_encoder()  # random weights: only its name (and width) must match what the CLI builds
    store_dir = tmp_path / "store"
    CaptionDatastore.build(encoder.encode_text(captions), captions, encoder_name=encoder.name).save(store_dir)
    gap_file = tmp_path / "gap.safetensors"
    GapStats.compute(torch.randn(20, EMBED_DIM), encoder.encode_text(captions)).save(gap_file)
    out, run_dir = tmp_path / "bundle", tmp_path / "run"
    argv = ["--corpus", str(corpus_file), "--datastore", str(store_dir), "--gap-stats", str(gap_file),
            "--encoder", str(encoder_json), "--lm", str(lm_dir_for_examples), "--out", str(out),
            "--run-dir", str(run_dir),
            "--k", "2", "--steps", "3", "--batch-size", "4", "--warmup", "1", "--checkpoint-every", "1",
            "--eval-samples", "4", "--max-new-tokens", "5", "--select-by", "clip", "--device", "cpu"]
    assert main(argv + ["--stop-after", "1"]) == 0
    assert not out.exists() and (run_dir / RETRIEVAL_CACHE).is_file()
    assert main(argv + ["--resume"]) == 0

    bundle = Bundle.load(out)
    history = json.loads(bundle.file("tomcap/training.json").read_text())
    assert history["history"][-1]["step"] == 3 and "text_to_text_exact" in history["evaluations"][-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "step-00000003.safetensors"
    component = bundle.component("tomcap")
    assert (component["k"], component["embed_dim"], component["datastore"]) == (2, EMBED_DIM, "bundle:tomcap/datastore")
    assert component["select_by"] == "clip"  # the bundle's default pick, not TOMCapConfig's "beam"
    model, store = load_from_bundle(bundle), datastore_from_bundle(bundle)
    bundled_encoder = encoder_from_bundle(bundle)
    embeds = bundled_encoder.encode_image_embeds(torch.rand(2, 3, 32, 32))
    results = caption_images(model, bundled_encoder, store, embeds, embeds,
                             options_from_config(TOMCapOptions, model.config))
    assert options_from_config(TOMCapOptions, model.config).select_by == "clip"
    assert len(results) == 2
    assert all(len(r.neighbours) == 2 and len(r.candidates) == model.config.beams for r in results)


def test_sigkilled_cli_runs_resume_to_the_weights_of_an_uninterrupted_run(tmp_path, tiny_encoder,
                                                                           lm_dir_for_examples, one_thread):
    """`python -m training tomcap` SIGKILLed twice (a seeded random delay after a checkpoint, then just as a
    checkpoint write begins) and resumed by the same command ends bit-identical to a run never killed."""
    from capdemo.methods.tomcap.model import TRAINABLE_WEIGHTS

    captions = TINY_CORPUS + ["a blue circle on the left", "two red squares", "a yellow star at the top",
                              "a white triangle on the right"]
    (tmp_path / "corpus.txt").write_text("\n".join(captions) + "\n")
    save_file(tiny_encoder.model.state_dict(), tmp_path / "clip.safetensors")  # the same encoder in every process
    tiny_encoder_config(pretrained=str(tmp_path / "clip.safetensors")).save_json(tmp_path / "encoder.json")
    embeds = tiny_encoder.encode_text(captions)
    CaptionDatastore.build(embeds, captions, encoder_name=tiny_encoder.name).save(tmp_path / "store")
    image_like = torch.randn(20, EMBED_DIM, generator=torch.Generator().manual_seed(0))
    GapStats.compute(image_like, embeds).save(tmp_path / "gap.safetensors")
    steps = 30  # 10 epochs of 3 steps; a checkpoint every step, so a kill often lands in a write

    def argv(name: str, *extra: str) -> list[str]:  # LoRA dropout and the input noise draw every step
        return ["--corpus", str(tmp_path / "corpus.txt"), "--datastore", str(tmp_path / "store"),
                "--gap-stats", str(tmp_path / "gap.safetensors"), "--encoder", str(tmp_path / "encoder.json"),
                "--lm", str(lm_dir_for_examples), "--out", str(tmp_path / name / "bundle"),
                "--run-dir", str(tmp_path / name / "run"), "--embeddings", str(tmp_path / "embeddings"),
                "--k", "2", "--steps", str(steps), "--batch-size", "4", "--warmup", "1", "--lr", "1e-3",
                "--checkpoint-every", "1", "--eval-samples", "2", "--max-new-tokens", "5", "--device", "cpu", *extra]

    assert main(argv("whole")) == 0
    plans = [random.Random(9).uniform(0.0, 0.3), MID_WRITE]
    kills = kill_during_training(["-m", "training", "tomcap", *argv("killed", "--resume")],
                                 tmp_path / "killed" / "run" / "checkpoints", plans, total_steps=steps)
    assert not (tmp_path / "killed" / "bundle").exists()
    assert main(argv("killed", "--resume")) == 0

    whole, resumed = Bundle.load(tmp_path / "whole" / "bundle"), Bundle.load(tmp_path / "killed" / "bundle")
    assert_same_tensors(resumed.tensors(TRAINABLE_WEIGHTS), whole.tensors(TRAINABLE_WEIGHTS), f"weights {kills}")
    reference = final_checkpoint_tensors(tmp_path / "whole" / "run")
    assert any(key.endswith("/exp_avg_sq") for key in reference) and any("lora" in key for key in reference)
    assert_same_tensors(final_checkpoint_tensors(tmp_path / "killed" / "run"), reference,
                        "final checkpoint (weights and AdamW)")
    for key in ("history", "evaluations"):  # the loss sums of intervals cut by a kill survive too
        assert resumed.json(TRAINING_RECORD)[key] == whole.json(TRAINING_RECORD)[key]
    checkpoints = tmp_path / "killed" / "run" / "checkpoints"
    assert not temp_files(checkpoints)  # a killed writer's leftovers are cleared
    assert [p.name for p in checkpoint_paths(checkpoints)][-1] == f"step-{steps:08d}.safetensors"

    # The comparison can fail: resuming the first kill's checkpoint as if it were one step earlier ends elsewhere.
    first = kills[0].checkpoints[-1]
    write_checkpoint_as_step(first, tmp_path / "wrong" / "run" / "checkpoints", first.step - 1)
    assert main(argv("wrong", "--resume")) == 0
    wrong = Bundle.load(tmp_path / "wrong" / "bundle").tensors(TRAINABLE_WEIGHTS)
    assert differs(wrong, whole.tensors(TRAINABLE_WEIGHTS))


def test_run_identity_covers_settings_corpus_datastore_and_gap_statistics():
    from types import SimpleNamespace

    from capdemo.gap import GapStats
    from capdemo.methods.tomcap.model import TOMCapConfig
    from training.tomcap import run_identity

    store = SimpleNamespace(meta=lambda: {"encoder_name": "tiny", "count": 10, "kind": "flat"})
    other_store = SimpleNamespace(meta=lambda: {"encoder_name": "tiny", "count": 11, "kind": "flat"})
    gap = GapStats(*(torch.full((4,), float(i)) for i in range(4)), n_image=5, n_text=5)
    shifted = GapStats(*(torch.full((4,), float(i) + (i == 1)) for i in range(4)), n_image=5, n_text=5)
    config, captions = TOMCapConfig(), ["a red circle.", "two blue squares."]
    base = run_identity(config, captions, store, gap)

    def changed(identity):
        return {key for key in base if base[key] != identity[key]}

    moved = config.replace(lm="/moved/gpt2", datastore="/moved/store")
    assert changed(run_identity(moved, captions, store, gap)) == set()
    assert changed(run_identity(config.replace(k=2), captions, store, gap)) == {"tomcap.k"}
    assert changed(run_identity(config, captions[:1], store, gap)) == {"corpus_sha256"}
    assert changed(run_identity(config, captions, other_store, gap)) == {"datastore"}
    assert changed(run_identity(config, captions, store, shifted)) == {"gap_stats_sha256"}


def test_the_papers_recipe_a_datastore_of_one_encoder_and_cross_attention_on_another(tmp_path, lm_dir_for_examples,
                                                                                    capsys):
    """The README's TOMCap recipe offline: `index --retrieval-encoder A`, then `tomcap --encoder B
    --retrieval-encoder A` (the paper: a SigLIP2 store, CLIP in the memory); the bundle carries A's weights and
    serves; leaving the flag out is refused in one line that names it."""
    from capdemo.pipeline import Captioner
    from capdemo.testing import example_images, tiny_encoder
    from training.__main__ import main as training_main

    captions = TINY_CORPUS + ["a blue circle on the left", "two red squares", "a yellow star at the top",
                              "a white triangle on the right"]
    (tmp_path / "corpus.txt").write_text("\n".join(captions) + "\n")
    specs = {}
    for name, seed in (("retriever", 5), ("clip", 0)):
        encoder = tiny_encoder(seed=seed, model_name=f"capdemo-tiny-{name}")
        save_file(encoder.model.state_dict(), tmp_path / f"{name}.safetensors")
        tiny_encoder_config(model_name=f"capdemo-tiny-{name}", pretrained=str(tmp_path / f"{name}.safetensors")
                            ).save_json(tmp_path / f"{name}.json")
        specs[name] = str(tmp_path / f"{name}.json")
    clip = tiny_encoder(seed=0, model_name="capdemo-tiny-clip")
    GapStats.compute(torch.randn(20, EMBED_DIM), clip.encode_text(captions), encoder_name=clip.name).save(
        tmp_path / "gap.safetensors")
    corpus = ["--corpus", str(tmp_path / "corpus.txt")]
    assert training_main(["index", *corpus, "--retrieval-encoder", specs["retriever"], "--out",
                          str(tmp_path / "store"), "--kind", "flat"]) == 0
    common = ["tomcap", *corpus, "--datastore", str(tmp_path / "store"),
              "--gap-stats", str(tmp_path / "gap.safetensors"),
              "--encoder", specs["clip"], "--lm", str(lm_dir_for_examples), "--k", "2", "--steps", "2",
              "--batch-size", "4", "--warmup", "1", "--eval-samples", "0", "--max-new-tokens", "4", "--device", "cpu"]
    assert training_main([*common, "--out", str(tmp_path / "wrong"), "--run-dir", str(tmp_path / "wrong-run")]) == 1
    assert "pass --retrieval-encoder capdemo-tiny-retriever" in capsys.readouterr().err
    assert training_main([*common, "--retrieval-encoder", specs["retriever"], "--out", str(tmp_path / "bundle"),
                          "--run-dir", str(tmp_path / "run")]) == 0

    bundle = Bundle.load(tmp_path / "bundle")
    spec = bundle.component("tomcap")["retrieval_encoder"]
    assert spec["pretrained"] == "bundle:tomcap/retriever.safetensors"
    assert spec["model_name"] == "capdemo-tiny-retriever"
    captioner = Captioner.from_bundle(tmp_path / "bundle", device="cpu")
    method = captioner.methods["tomcap"]
    assert method.retriever.name == "capdemo-tiny-retriever" and method.retriever is not captioner.encoder
    images = example_images()
    result = captioner.caption(images, "tomcap")[0]
    queries = method.retriever.encode_image_embeds(method.retriever.preprocess(images[:1]))
    assert [n.text for n in result.neighbours] == [n.text for n in method.datastore.retrieve(queries, 2)[0]]

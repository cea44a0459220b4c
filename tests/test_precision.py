"""Serving precision (capdemo.precision): what each precision converts, that the conversions compute what they
claim, and that both methods of the tiny bundle caption at every precision."""

from __future__ import annotations

import copy
import json
import logging

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from transformers.pytorch_utils import Conv1D

from capdemo import precision
from capdemo.analysis import embedding_view
from capdemo.bundle import Bundle
from capdemo.encoders import ClipEncoder
from capdemo.methods.tomcap.inference import load_from_bundle as load_tomcap
from capdemo.pipeline import SERVING_KEY, Captioner, serving_precision
from capdemo.precision import PRECISIONS, PrecisionError, apply_precision, conv1d_to_linear, merge_lora
from capdemo.testing import TINY_CAPDEC, TINY_CLIP_CONFIG, TINY_TOMCAP, example_images, tiny_gpt2

GPT2_LAYERS = 2  # capdemo.testing.tiny_gpt2's n_layer
CONV1D_PER_BLOCK = 4  # GPT-2 block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
CROSS_CONV1D_PER_BLOCK = 3  # crossattention.c_attn, .q_attn, .c_proj
CLIP_BLOCKS = TINY_CLIP_CONFIG["vision_cfg"]["layers"] + TINY_CLIP_CONFIG["text_cfg"]["layers"]


def _count(module: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in module.modules())


def _clone_encoder(encoder: ClipEncoder) -> ClipEncoder:
    return ClipEncoder(copy.deepcopy(encoder.model), encoder.transform, encoder.tokenizer,
                       embed_dim=encoder.embed_dim, name=encoder.name)


# --- names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp16", "INT8", "", "float32"])
def test_an_unknown_precision_is_a_one_line_value_error(name):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8") as caught:
        apply_precision(nn.Linear(2, 2), name)
    assert isinstance(caught.value, PrecisionError) and "\n" not in str(caught.value)


def test_fp32_changes_nothing(tiny_tokenizer):
    lm = tiny_gpt2(tiny_tokenizer)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    report = apply_precision(lm, "fp32")
    assert report.summary() == "fp32: unchanged" and report.quantized_total == 0
    after = lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _count(lm, Conv1D) == GPT2_LAYERS * CONV1D_PER_BLOCK


# --- int8 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in, fan_out, rows", [(64, 192, (3, 5)), (128, 512, (40, 1)), (512, 128, (2, 7))])
def test_conv1d_becomes_a_linear_with_exactly_the_same_outputs(fan_in, fan_out, rows):
    torch.manual_seed(0)
    conv = Conv1D(fan_out, fan_in)
    nn.init.normal_(conv.bias)
    linear = conv1d_to_linear(conv)
    assert type(linear) is nn.Linear and linear.weight.shape == (fan_out, fan_in)
    assert linear.weight.data_ptr() == conv.weight.data_ptr()  # a view: no copy
    x = torch.randn(*rows, fan_in)
    assert torch.equal(linear(x), conv(x))  # bit for bit, float32


def test_int8_quantizes_every_gpt2_layer_and_the_lm_head(tiny_tokenizer):
    lm = tiny_gpt2(tiny_tokenizer)
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.inference_mode():
        reference = lm(ids).logits
    report = apply_precision(lm, "int8")
    conv1d = GPT2_LAYERS * CONV1D_PER_BLOCK
    assert report.quantized == {"Conv1D": conv1d, "Linear": 1}  # + the LM head
    assert _count(lm, DynamicQuantizedLinear) == conv1d + 1 == report.quantized_total
    assert _count(lm, Conv1D) == 0 and _count(lm, nn.Linear) == 0
    assert lm.transformer.wte.weight.dtype == torch.float32  # the embedding is looked up, not multiplied
    with torch.inference_mode():
        logits = lm(ids).logits
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert F.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.99  # close, not equal


def test_int8_leaves_attention_modules_float_and_quantizes_clip_mlps(tiny_encoder):
    encoder = _clone_encoder(tiny_encoder)
    texts = ["a red circle", "two green triangles"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before_text, before_image = tiny_encoder.encode_text(texts), tiny_encoder.encode_images(pixels)
    report = apply_precision(encoder, "int8")
    assert report.quantized == {"Linear": 2 * CLIP_BLOCKS}  # mlp.c_fc and mlp.c_proj of every block
    assert report.kept_float == {"MultiheadAttention": CLIP_BLOCKS}
    assert _count(encoder, DynamicQuantizedLinear) == 2 * CLIP_BLOCKS
    for mha in (m for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)):
        assert mha.in_proj_weight.dtype == torch.float32 and type(mha.out_proj.weight) is nn.Parameter
    text, image = encoder.encode_text(texts), encoder.encode_images(pixels)
    assert F.cosine_similarity(text, before_text).min() > 0.99
    assert F.cosine_similarity(image.image_embeds, before_image.image_embeds).min() > 0.99
    assert image.attention.shape == before_image.attention.shape


def test_int8_merges_lora_and_keeps_tomcaps_memory_projection(tiny_bundle_dir):
    model = load_tomcap(Bundle.load(tiny_bundle_dir))
    lora_layers = GPT2_LAYERS * len(model.config.lora_targets)
    report = apply_precision(model, "int8")
    assert report.lora_merged == lora_layers
    assert report.quantized == {"Conv1D": GPT2_LAYERS * (CONV1D_PER_BLOCK + CROSS_CONV1D_PER_BLOCK), "Linear": 1}
    assert report.kept_float == {"TOMCap.memory_proj": 1}
    assert type(model.memory_proj[0]) is nn.Linear  # TOMCap reads its weight's dtype and device


def test_int8_refuses_weights_that_are_not_float32(tiny_tokenizer):
    lm = tiny_gpt2(tiny_tokenizer).to(torch.bfloat16)
    with pytest.raises(PrecisionError, match="float32 weights; this model holds torch.bfloat16"):
        apply_precision(lm, "int8")


def test_keep_leaves_a_subtree_in_float32():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    report = apply_precision(model, "int8", keep=[model[1]])
    assert report.quantized == {"Linear": 1} and report.kept_float == {"keep": 1}
    assert type(model[0]) is DynamicQuantizedLinear and type(model[1][0]) is type(model[1][2]) is nn.Linear


# --- LoRA -------------------------------------------------------------------------------------------------------


def test_merged_lora_computes_what_the_adapters_did(tiny_bundle_dir):
    model = load_tomcap(Bundle.load(tiny_bundle_dir))
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # the bundle's LoRA B starts at zero: give the adapters something to merge
        if type(module) is nn.Linear and module is not model.memory_proj[0]:
            module.weight.data.normal_(0, 0.2, generator=generator)
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    memory = torch.randn(1, 3, model.lm.config.n_embd, generator=generator)
    with torch.inference_mode():
        reference = model.lm(ids, encoder_hidden_states=memory).logits
        assert merge_lora(model) == GPT2_LAYERS * len(model.config.lora_targets)
        merged = model.lm(ids, encoder_hidden_states=memory).logits
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)


# --- bf16 -------------------------------------------------------------------------------------------------------


def test_bf16_casts_the_model_and_runs_attention_in_float32(tiny_encoder):
    encoder = _clone_encoder(tiny_encoder)
    texts = ["a red circle", "two green triangles"]
    before = tiny_encoder.encode_text(texts)
    report = apply_precision(encoder, "bf16")
    assert report.kept_float == {"MultiheadAttention": CLIP_BLOCKS}
    attention = {id(t) for m in encoder.modules() if isinstance(m, nn.MultiheadAttention) for t in m.parameters()}
    others = [t for t in encoder.parameters() if id(t) not in attention]
    assert report.cast_tensors == len(others) + sum(1 for _ in encoder.buffers())
    assert all(t.dtype == torch.bfloat16 for t in others)
    assert all(t.dtype == torch.float32 for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)
               for t in m.parameters())
    mha = next(m for m in encoder.modules() if isinstance(m, nn.MultiheadAttention))
    x = torch.randn(2, 5, mha.embed_dim, dtype=torch.bfloat16)
    out, weights = mha(x, x, x, need_weights=True)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16  # cast back for the bf16 model
    after = encoder.encode_text(texts)
    assert after.dtype == torch.float32 and F.cosine_similarity(after, before).min() > 0.99


def test_bf16_warns_once_where_the_cpu_has_no_bf16_instructions(tiny_tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with caplog.at_level(logging.WARNING, logger="capdemo.precision"):
        report = apply_precision(tiny_gpt2(tiny_tokenizer), "bf16")
    assert report.bf16_native is False and "emulated" in report.summary()
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                           ("fpu avx2 avx512f avx512_vnni", False)])
def test_bf16_support_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.bf16_is_native("cpu") is native


def test_arm_bf16_feature_counts(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.bf16_is_native("cpu")


# --- the tiny bundle at every precision -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_captioner(tiny_bundle_dir) -> Captioner:
    return Captioner.from_bundle(tiny_bundle_dir, device="cpu", precision="fp32")


CANDIDATES = {"maccap": 4, "tomcap": TINY_TOMCAP["beams"], "capdec": TINY_CAPDEC["beams"]}  # at samples=4


@pytest.mark.parametrize("name", PRECISIONS)
def test_every_method_captions_at_every_precision(tiny_bundle_dir, reference_captioner, name):
    captioner = Captioner.from_bundle(tiny_bundle_dir, device="cpu", precision=name)
    reports = captioner.precision_reports
    encoder = f"encoder:{captioner.encoder.name}"
    assert set(reports) == {encoder, "maccap", "tomcap", "capdec", "vqa:lm"}
    assert {r.precision for r in reports.values()} == {name}
    assert captioner.info()["precision"] == name and set(captioner.info()["precision_reports"]) == set(reports)
    images = example_images()
    for method, count in CANDIDATES.items():
        settings = {"samples": 4, "seed": 1} if method == "maccap" else {}
        results = captioner.caption(images, method, **settings)
        reference = reference_captioner.caption(images, method, **settings)
        assert len(results) == len(images)
        for result, expected in zip(results, reference):
            assert len(result.candidates) == count and result.caption == result.candidates[0].text
            assert all(isinstance(c.text, str) and -1.0 <= c.clip_score <= 1.0 for c in result.candidates)
            image, expected_image = result.embeddings["image"], expected.embeddings["image"]
            if name == "fp32":  # untouched: the very same numbers
                assert torch.equal(image, expected_image)
                assert [c.text for c in result.candidates] == [c.text for c in expected.candidates]
            else:
                assert F.cosine_similarity(image, expected_image).item() > 0.99
    answer = captioner.answer(images[0], "what colour is it?", top_k=3)  # VQA drives the same MacCap LM
    assert len(answer.top_answers) == 3 and answer.answer == answer.top_answers[0][0]
    encoded = captioner.encode(images[:1])
    maccap = captioner.caption(encoded, "maccap", samples=4, seed=1)[0]
    view = embedding_view(encoded.features, {"maccap": maccap}, {"maccap": "MacCap"})
    patches = next(group for group in view.groups if group.kind == "patches")
    assert patches.vectors.dtype == "float32" and patches.vectors.shape[0] == 16
    if name == "int8":  # the LM's blocks and head, the adaptor's decoder feed-forward and MLP
        config = captioner.method("maccap").model.config
        assert reports["maccap"].quantized == {"Conv1D": GPT2_LAYERS * CONV1D_PER_BLOCK,
                                               "Linear": 1 + 2 * config.layers + config.mlp_layers}


def test_the_bundle_recommendation_serves_on_a_cpu_only(tiny_bundle_dir, tmp_path):
    bundle = Bundle.load(tiny_bundle_dir)
    assert serving_precision(bundle, "cpu") == "fp32"  # no recommendation written
    bundle.manifest[SERVING_KEY] = {"precision": "int8"}
    assert serving_precision(bundle, "cpu") == "int8"
    assert serving_precision(bundle, "cuda") == "fp32"  # int8 is CPU arithmetic
    assert serving_precision(bundle, "cpu", "bf16") == "bf16"  # asked for: always wins
    bundle.manifest[SERVING_KEY] = {"precision": "fp8"}
    with pytest.raises(PrecisionError, match="precision must be one of"):
        serving_precision(bundle, "cpu")


def test_a_bf16_recommendation_falls_back_to_fp32_on_a_cpu_without_bf16_instructions(tiny_bundle_dir, monkeypatch):
    from capdemo import precision

    bundle = Bundle.load(tiny_bundle_dir)
    bundle.manifest[SERVING_KEY] = {"precision": "bf16"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert serving_precision(bundle, "cpu") == "fp32"  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert serving_precision(bundle, "cpu") == "bf16"
    assert serving_precision(bundle, "cpu", "bf16") == "bf16"  # asked for: still served as asked


def test_the_shipped_bundle_recommends_a_precision_only_with_its_measured_quality():
    """weights/shapes records the paired shapes-eval (n = 500) behind its recommendation: loss <= 0.01 each."""
    manifest = Bundle.load(Path(__file__).resolve().parents[1] / "weights" / "shapes").manifest
    serving = manifest[SERVING_KEY]
    evidence = serving["evidence"]
    assert evidence["n"] >= 500 and set(evidence["scene_accuracy_loss"]) == set(manifest["components"]) - {
        "encoder", "vqa"}
    assert all(loss <= 0.01 for loss in evidence["scene_accuracy_loss"].values())


def test_the_cli_takes_a_precision_and_refuses_an_unknown_one(tiny_bundle_dir, capsys):
    from capdemo.__main__ import main

    with pytest.raises(SystemExit):
        main(["info", "--weights", str(tiny_bundle_dir), "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert main(["info", "--weights", str(tiny_bundle_dir), "--precision", "bf16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["precision"] == "bf16" and all(s.startswith("bf16") for s in info["precision_reports"].values())

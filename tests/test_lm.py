"""Generation from embeddings: the shared-prompt prefill gives the stock beam search's ids with less work."""

from __future__ import annotations

import pytest
import torch

from capdemo.lm import generate_from_embeds
from capdemo.testing import tiny_gpt2, tiny_opt

N, LENGTH, NEW = 3, 7, 5


def _prompts(model, *, left_padding: bool, seed: int = 0):
    """(N, LENGTH, E) random prompt embeddings and their mask; with left padding, rows start 0, 2 and 4 late."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(N, LENGTH, model.get_input_embeddings().embedding_dim, generator=generator)
    mask = torch.ones(N, LENGTH, dtype=torch.long)
    if left_padding:
        for row in range(N):
            mask[row, : 2 * row] = 0
    return embeds, mask


def _lm(kind: str, tokenizer):
    return {"gpt2": lambda: tiny_gpt2(tokenizer), "opt": lambda: tiny_opt(tokenizer),
            "gpt2-cross": lambda: tiny_gpt2(tokenizer, cross_attention=True)}[kind]()


@pytest.mark.parametrize("kind", ["gpt2", "opt", "gpt2-cross"])
@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("beams,returned", [(3, 1), (3, 3), (1, 1)])
def test_shared_prompt_prefill_gives_the_stock_ids(tiny_tokenizer, kind, left_padding, beams, returned):
    model = _lm(kind, tiny_tokenizer)
    embeds, mask = _prompts(model, left_padding=left_padding)
    extra = {}
    if kind == "gpt2-cross":  # TOMCap's memory: (N, M, n_embd), expanded per beam by generate
        generator = torch.Generator().manual_seed(1)
        extra["encoder_hidden_states"] = torch.randn(N, 4, model.config.n_embd, generator=generator)
    eos = tiny_tokenizer.eos_token_id
    runs = [generate_from_embeds(model, embeds, mask, eos_token_id=eos, pad_token_id=eos, beams=beams,
                                 num_return_sequences=returned, max_new_tokens=NEW, share_prompt=share, **extra)
            for share in (False, True)]
    assert runs[0].shape[0] == N * returned
    assert torch.equal(runs[0], runs[1])


def _positions_processed(model, **kwargs) -> int:
    """Token positions that go through GPT-2's body during one generate call (counted at its position table)."""
    count = 0

    def hook(module, args, output):
        nonlocal count
        count += output.shape[0] * output.shape[1]  # (rows, positions, n_embd)

    handle = model.transformer.wpe.register_forward_hook(hook)
    try:
        generate_from_embeds(model, **kwargs)
    finally:
        handle.remove()
    return count


def test_shared_prompt_prefill_runs_the_prompt_once_per_input(tiny_tokenizer):
    model = tiny_gpt2(tiny_tokenizer)
    embeds, mask = _prompts(model, left_padding=False)
    eos, beams = tiny_tokenizer.eos_token_id, 4
    common = dict(inputs_embeds=embeds, attention_mask=mask, eos_token_id=eos, pad_token_id=eos, beams=beams,
                  max_new_tokens=NEW, min_new_tokens=NEW)
    decode_steps = N * beams * (NEW - 1)  # every new token but the last is fed back
    stock = _positions_processed(model, share_prompt=False, **common)
    shared = _positions_processed(model, share_prompt=True, **common)
    assert stock == N * beams * LENGTH + decode_steps
    assert shared == N * (LENGTH - 1) + N * beams + decode_steps


def test_a_language_model_without_safetensors_is_refused_by_name(tmp_path, tiny_tokenizer):
    """A folder (or hub revision) holding only a pickle checkpoint gets one line naming the fix, not a load."""
    from capdemo.lm import LanguageModelError, load_causal_lm, save_causal_lm

    folder = save_causal_lm(tiny_gpt2(tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95\x10\x00\x00")
    with pytest.raises(LanguageModelError) as info:
        load_causal_lm(folder)
    message = str(info.value)
    assert "\n" not in message and "no *.safetensors" in message and "refs/pr/N" in message


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_loaded_and_saved_again_language_model_has_the_same_files(tmp_path, tiny_tokenizer, monkeypatch, offline):
    """Loading records how (a local folder, HF_HUB_OFFLINE) in the tokenizer's config; saving leaves that out, so a
    bundle's LM folder does not depend on the environment of the build that wrote it."""
    from capdemo.lm import load_causal_lm, save_causal_lm

    first = save_causal_lm(tiny_gpt2(tiny_tokenizer), tiny_tokenizer, tmp_path / "first")
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    model, tokenizer = load_causal_lm(first)
    again = save_causal_lm(model, tokenizer, tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for path in first.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name

"""The beam cache's layer: in-place appends, reordering that moves only what differs between beams."""

from __future__ import annotations

import pytest
import torch

from capdemo.beam_cache import BeamSharedPrefixLayer, prompt_cache
from capdemo.lm import generate_from_embeds
from capdemo.testing import tiny_gpt2

ROWS, HEADS, SHARED, DIM = 4, 2, 3, 5  # 2 inputs x 2 beams


def _states(length: int, start: float) -> torch.Tensor:
    """(ROWS, HEADS, length, DIM) where every entry names its row and position: 100 * row + position + start."""
    row = torch.arange(ROWS, dtype=torch.float32).view(ROWS, 1, 1, 1)
    position = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)
    return (100 * row + position + start).expand(ROWS, HEADS, length, DIM).clone()


def test_update_appends_in_place_and_grows_when_full():
    layer = BeamSharedPrefixLayer(_states(SHARED, 0), _states(SHARED, 0.5), shared_length=SHARED, room=1)
    buffer = layer._key_buffer
    keys, values = layer.update(_states(1, 10), _states(1, 10.5))
    assert layer._key_buffer is buffer  # within the room: written into the same buffer
    assert keys.shape == (ROWS, HEADS, SHARED + 1, DIM) and layer.get_seq_length() == SHARED + 1
    assert torch.equal(keys, torch.cat([_states(SHARED, 0), _states(1, 10)], dim=2))
    keys, values = layer.update(_states(2, 20), _states(2, 20.5))  # past the room: the buffer grows
    assert layer._key_buffer is not buffer and layer.get_seq_length() == SHARED + 3
    expected = torch.cat([_states(SHARED, 0.5), _states(1, 10.5), _states(2, 20.5)], dim=2)
    assert torch.equal(values, expected)


def test_reorder_moves_only_positions_after_the_shared_prefix():
    layer = BeamSharedPrefixLayer(_states(SHARED, 0), _states(SHARED, 0), shared_length=SHARED, room=2)
    layer.update(_states(2, 10), _states(2, 10))
    beam_idx = torch.tensor([1, 1, 3, 2])  # input 0 keeps its beam 1 twice; input 1 swaps its beams
    layer.reorder_cache(beam_idx)
    # The prefix rows here are deliberately different per row, to show they are not moved: in a real
    # search they are equal across an input's beams, which is what makes skipping them exact.
    assert torch.equal(layer.keys[:, :, :SHARED], _states(SHARED, 0))
    assert torch.equal(layer.keys[:, :, SHARED:], _states(2, 10)[beam_idx])
    assert torch.equal(layer.values[:, :, SHARED:], _states(2, 10)[beam_idx])


def test_prompt_cache_shares_the_prompt_and_leaves_room_for_the_new_tokens(tiny_tokenizer):
    model = tiny_gpt2(tiny_tokenizer)
    n, length, beams, new = 2, 6, 3, 4
    embeds = torch.randn(n, length, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = prompt_cache(model, embeds, torch.ones(n, length, dtype=torch.long), beams, max_new_tokens=new)
    assert len(cache.layers) == model.config.n_layer
    for layer in cache.layers:
        assert isinstance(layer, BeamSharedPrefixLayer)
        assert layer.shared_length == length - 1 and layer.keys.shape[0] == n * beams
        assert layer._key_buffer.shape[2] == length - 1 + new  # the last prompt position + new - 1 fed-back tokens
        rows = layer.keys.view(n, beams, *layer.keys.shape[1:])
        assert torch.equal(rows, rows[:, :1].expand_as(rows))  # every beam of an input holds the same prompt


@pytest.mark.parametrize("new", [1, 6])
def test_generation_never_outgrows_the_reserved_room(tiny_tokenizer, new, monkeypatch):
    """The room prompt_cache reserves is exactly what generate writes: no buffer is reallocated."""
    model = tiny_gpt2(tiny_tokenizer)
    grown = []
    allocate = BeamSharedPrefixLayer._allocate
    monkeypatch.setattr(BeamSharedPrefixLayer, "_allocate",
                        staticmethod(lambda states, capacity: grown.append(capacity) or allocate(states, capacity)))
    embeds = torch.randn(2, 5, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    eos = tiny_tokenizer.eos_token_id
    ids = generate_from_embeds(model, embeds, eos_token_id=eos, pad_token_id=eos, beams=3, max_new_tokens=new,
                               min_new_tokens=new)
    assert ids.shape == (2, new)
    assert grown == [4 + new] * (2 * model.config.n_layer)  # keys and values per layer, at construction only

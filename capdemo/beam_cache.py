"""A beam search's key/value cache that knows which positions every beam of an input shares.

``generate``'s beam search keeps one cache row per beam. After every step it
reorders the rows to follow the surviving beams (``index_select`` over the whole
cache) and appends the new position by concatenation (another whole copy). With
MacCap's 33-position prompt and 16 new tokens, most of those bytes are prompt
positions, and they are the same in every beam of an input, so moving them is
wasted: at 20 samples x 4 beams of GPT-2 base the two copies took ~18 % of a
CPU caption.

:func:`prompt_cache` prefills the prompt once per input and hands ``generate`` a
cache of :class:`BeamSharedPrefixLayer` layers: a buffer with room for the new
positions, written in place, whose reordering moves only the positions after
the shared prefix. Cross-attention states (TOMCap's memory) are shared by every
beam in full, so their layers never move. The token ids are the stock search's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache


class BeamSharedPrefixLayer(DynamicLayer):
    """One attention layer's keys/values for B x beams rows; positions [0, shared_length) are equal across
    the beams of an input, which is what lets :meth:`reorder_cache` skip them.

    ``keys``/``values`` are views (rows, heads, length, head_dim) of buffers holding ``capacity`` positions;
    :meth:`update` writes into the buffer (growing it only when full) and returns the views.
    """

    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, shared_length: int, room: int):
        super().__init__()
        rows, heads, length, _ = keys.shape  # (rows, heads, length, head_dim)
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.shared_length = shared_length
        self._key_buffer = self._allocate(keys, length + room)
        self._value_buffer = self._allocate(values, length + room)
        self._set_length(length)

    @staticmethod
    def _allocate(states: torch.Tensor, capacity: int) -> torch.Tensor:
        rows, heads, length, head_dim = states.shape
        buffer = states.new_empty(rows, heads, capacity, head_dim)
        buffer[:, :, :length] = states
        return buffer

    def _set_length(self, length: int) -> None:
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:  # more positions than planned for: grow (copies once)
            self._key_buffer = self._allocate(self.keys, 2 * end)
            self._value_buffer = self._allocate(self.values, 2 * end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the surviving beams: only positions past the shared prefix differ between them."""
        shared, length = self.shared_length, self.keys.shape[-2]
        if length > shared:
            beam_idx = beam_idx.to(self.device)
            for buffer in (self._key_buffer, self._value_buffer):
                buffer[:, :, shared:length] = buffer[:, :, shared:length].index_select(0, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BeamSharedPrefixLayer is built after the beams are laid out")

    def reset(self) -> None:
        raise NotImplementedError("BeamSharedPrefixLayer serves one beam search; build a new cache instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("BeamSharedPrefixLayer only serves beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BeamSharedPrefixLayer only serves beam search")


def _share_prefix(cache: DynamicCache, room: int) -> None:
    """Swap each plain layer of a freshly prefilled ``cache`` for a :class:`BeamSharedPrefixLayer` whose
    shared prefix is everything cached so far, with ``room`` positions to come. Other layer kinds
    (sliding-window, linear-attention, ...) keep their own reordering."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            continue
        length = layer.get_seq_length()
        if length:
            cache.layers[index] = BeamSharedPrefixLayer(layer.keys, layer.values, shared_length=length, room=room)


def prompt_cache(model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, repeats: int,
                 *, max_new_tokens: int, **model_kwargs: Any) -> DynamicCache | EncoderDecoderCache:
    """Key/value cache of every prompt position but the last (N, L, E) -> cache of N * ``repeats`` rows.

    Runs the LM body once per prompt on positions [0, L - 1), with the position
    ids ``generate`` derives from the attention mask (left padding works), then
    repeats each row ``repeats`` times, adjacent as ``generate`` expands beams.
    ``generate`` then runs only the last prompt position per beam, and the
    ``max_new_tokens`` positions after it are written into room reserved here.
    """
    mask = attention_mask[:, :-1]
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (N, L - 1), as generate makes them
    out = model.base_model(inputs_embeds=inputs_embeds[:, :-1], attention_mask=mask, position_ids=position_ids,
                           use_cache=True, **model_kwargs)
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeats)
    if isinstance(cache, EncoderDecoderCache):
        _share_prefix(cache.self_attention_cache, room=max_new_tokens)
        _share_prefix(cache.cross_attention_cache, room=0)  # the encoder's states: equal for every beam, never move
    else:
        _share_prefix(cache, room=max_new_tokens)
    return cache

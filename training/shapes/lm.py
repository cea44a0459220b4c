"""The shapes world's language model: a byte-level BPE tokenizer and a tiny GPT-2, trained on captions only.

The real world uses a pretrained OPT or GPT-2 from the hub; this is its
stand-in, small enough to train on two CPU cores in a minute. Training packs
several captions per sequence (separated by the EOS token) so every position up
to ``n_positions`` is trained, including the positions after a MacCap prefix
and inside a TOMCap prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from capdemo.config import Config

BOS_EOS = "<|endoftext|>"
PACKED_LENGTH = 48  # tokens per pretraining row: two to four captions, or one prompt-shaped text
PAD = "<pad>"


@dataclass
class TinyLMConfig(Config):
    """Size of the shapes world's GPT-2."""

    vocab_size: int = 400  # BPE vocabulary (the world has ~40 words, prompts add ~10 more)
    n_embd: int = 128  # hidden width
    n_layer: int = 3  # transformer blocks
    n_head: int = 2  # attention heads (few and wide: on CPU the cost of many tiny heads dominates)
    n_positions: int = 160  # longest sequence: a TOMCap prompt with 4 neighbours plus the caption fits


def train_tokenizer(texts: Sequence[str], *, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) fitted to ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS_EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_EOS, eos_token=BOS_EOS, pad_token=PAD)


def build_lm(tokenizer, config: TinyLMConfig, *, seed: int = 0):
    """A randomly initialised GPT-2 sized by ``config``, with the tokenizer's special ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # a 40-word world does not overfit; dropout only costs time
    )
    return GPT2LMHeadModel(gpt2_config)


class PackedCaptions(Dataset):
    """Captions packed into fixed-length rows: ``eos c1 eos c2 eos ...``, cut at ``length`` tokens."""

    def __init__(self, captions: Sequence[str], tokenizer, *, length: int, seed: int = 0):
        eos = tokenizer.eos_token_id
        order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
        ids = tokenizer([captions[i] for i in order], add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for caption_ids in ids:
            stream += [eos, *caption_ids]
        usable = (len(stream) // length) * length
        self.rows = torch.tensor(stream[:usable], dtype=torch.long).view(-1, length)  # (N, length)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index]


def lm_loss(lm, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over a packed batch (B, L)."""
    return lm(input_ids=batch, labels=batch).loss


def pretrain_lm(captions: Sequence[str], config: TinyLMConfig, train_config, *, extra_texts: Sequence[str] = (),
                resume: bool = False):
    """Fit the tokenizer (on captions + ``extra_texts``, e.g. prompt templates) and train the LM on captions.

    Returns (lm, tokenizer, TrainResult); the LM comes back in eval mode with gradients off.
    """
    from training.loop import TrainTask, train

    tokenizer = train_tokenizer([*captions, *extra_texts], vocab_size=config.vocab_size)
    lm = build_lm(tokenizer, config, seed=train_config.seed)
    dataset = PackedCaptions(captions, tokenizer, length=min(PACKED_LENGTH, config.n_positions), seed=train_config.seed)
    task = TrainTask(model=lm, dataset=dataset, collate_fn=torch.stack, loss_fn=lm_loss)
    result = train(task, train_config, resume=resume)
    lm.eval().requires_grad_(False)
    return lm, tokenizer, result

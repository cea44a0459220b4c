"""The shapes world's language model: a byte-level BPE tokenizer and a tiny GPT-2, trained on captions only.

The real world uses a pretrained OPT or GPT-2 from the hub; this is its
stand-in, small enough to train on two CPU cores in minutes. Training packs
several captions per sequence (separated by the EOS token) so every position up
to ``n_positions`` is trained, including the positions after a MacCap prefix
and inside a TOMCap prompt; question-answer texts (the VQA prompt followed by
answers) get rows of their own that start where a VQA prompt starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from capdemo.config import Config
from capdemo.vqa import VQA_PROMPT

BOS_EOS = "<|endoftext|>"
PACKED_LENGTH = 48  # tokens per pretraining row: two to four captions, or one prompt-shaped text
PAD = "<pad>"


@dataclass
class TinyLMConfig(Config):
    """Size of the shapes world's GPT-2."""

    vocab_size: int = 400  # BPE vocabulary (the world has ~40 words, prompts add ~10 more)
    n_embd: int = 128  # hidden width
    n_layer: int = 3  # transformer blocks
    n_head: int = 4  # attention heads
    n_positions: int = 160  # longest sequence: a TOMCap prompt with 4 neighbours plus the caption fits
    # loss weight of each answer token in the question-answer rows (every other token: 1). Reading an attribute
    # back from the caption is the one skill VQA needs that plain captions never teach; weighting its rare
    # tokens up (together with rows that start where a VQA prompt starts) is what let it emerge in the budget.
    # On the true captions of 200 held-out scenes (shapes-lm, one thread, answers decoded greedily): 1 -> 0.554,
    # 5 (world v1 and the first v2 bundle) -> 0.796, 20 at lr 3e-3 -> 0.790, 20 at the recipe's lr 1e-3 -> 0.836
    answer_weight: float = 20.0


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


def answer_cue(tokenizer) -> list[int]:
    """Token ids of the text that ends a VQA prompt (" Answer:"): the next token is the answer."""
    return tokenizer(VQA_PROMPT.rsplit("{question}", 1)[1], add_special_tokens=False)["input_ids"]


class PretrainingRows(Dataset):
    """The LM's pretraining rows, each ``length`` tokens, with per-token loss weights.

    Captions (and other free text) are packed as in :class:`PackedCaptions`. Each of ``aligned`` (the
    question-answer texts) gets a row of its own that starts at position 0, ``eos text eos`` and padding,
    exactly where a VQA prompt starts at inference. Weights are 1, 0 on padding, and ``answer_weight`` on the
    token right after the answer cue (" Answer:"), the answer the caption implies. Item:
    ``{"input_ids": (length,) long, "weights": (length,) float}``.
    """

    def __init__(self, packed: Sequence[str], aligned: Sequence[str], tokenizer, *, length: int,
                 answer_weight: float = 1.0, seed: int = 0):
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = [PackedCaptions(packed, tokenizer, length=length, seed=seed).rows] if packed else []
        if aligned:
            block = torch.full((len(aligned), length), pad, dtype=torch.long)
            for row, ids in enumerate(tokenizer(list(aligned), add_special_tokens=False)["input_ids"]):
                ids = [eos, *ids, eos][:length]
                block[row, : len(ids)] = torch.tensor(ids)
            rows.append(block)
        if not rows:
            raise ValueError("no pretraining text")
        self.ids = torch.cat(rows)  # (N, length)
        weights = torch.ones(self.ids.shape)
        weights[self.ids == pad] = 0.0
        cue = answer_cue(tokenizer)
        follows_cue = torch.ones(self.ids.shape, dtype=torch.bool)  # position t: tokens t-len(cue)..t-1 are the cue
        follows_cue[:, : len(cue)] = False
        for back, token in enumerate(reversed(cue), start=1):
            follows_cue[:, len(cue):] &= self.ids[:, len(cue) - back: length - back] == token
        weights[follows_cue & (self.ids != pad)] = answer_weight
        self.weights = weights  # (N, length): the loss weight of predicting each token

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "weights": self.weights[index]}


def collate_rows(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack :class:`PretrainingRows` items: input_ids (B, L) long, weights (B, L) float."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def weighted_lm_loss(lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over a batch of :class:`PretrainingRows` items, weighted per token."""
    ids, weights = batch["input_ids"], batch["weights"]  # (B, L) each
    logits = lm(input_ids=ids).logits[:, :-1]  # (B, L - 1, V): position t predicts token t + 1
    per_token = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L - 1)
    return (per_token * weights[:, 1:]).sum() / weights[:, 1:].sum().clamp_min(1e-8)


def pretrain_lm(captions: Sequence[str], config: TinyLMConfig, train_config, *, aligned_texts: Sequence[str] = (),
                extra_texts: Sequence[str] = (), resume: bool = False):
    """Fit the tokenizer (on every text and ``extra_texts``) and train the LM on ``captions`` (packed) and
    ``aligned_texts`` (one row each, from position 0; e.g. question-answer texts, see :class:`PretrainingRows`).

    Returns (lm, tokenizer, TrainResult); the LM comes back in eval mode with gradients off.
    """
    from training.loop import TrainTask, train

    tokenizer = train_tokenizer([*captions, *aligned_texts, *extra_texts], vocab_size=config.vocab_size)
    lm = build_lm(tokenizer, config, seed=train_config.seed)
    dataset = PretrainingRows(captions, aligned_texts, tokenizer, length=min(PACKED_LENGTH, config.n_positions),
                              answer_weight=config.answer_weight, seed=train_config.seed)
    task = TrainTask(model=lm, dataset=dataset, collate_fn=collate_rows, loss_fn=weighted_lm_loss)
    result = train(task, train_config, resume=resume)
    lm.eval().requires_grad_(False)
    return lm, tokenizer, result

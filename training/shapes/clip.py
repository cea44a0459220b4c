"""The shapes world's CLIP: a tiny open_clip model trained contrastively on generated image-caption pairs.

The model is an ordinary open_clip architecture, registered at run time under ``SHAPES_CLIP_NAME``
and built through :mod:`capdemo.encoders`, so the encoder that is trained here is exactly the one
the app loads from the bundle. Two choices make it a faithful miniature of a real CLIP:

* The logit scale is fixed (a low temperature). Both towers start in narrow cones pointing in
  different directions (Liang et al. 2022); a learnable scale drifts low in this small world and
  training closes the gap, a fixed high one preserves it: the means of the two modalities stay
  apart and a linear probe separates them, which is what text-only captioning has to overcome.
  The default is CLIP's final value, 100; the shapes recipe uses 300 (see training.shapes.build).
  Mismatched pairs (``mismatched``, Yaras et al. 2024) preserve it too. :func:`evaluate_clip`
  reports the gap as for real CLIP.
* The loss is CLIP's symmetric InfoNCE. The world is small (846 scenes), so a batch holds
  few of the near misses that separate "a red circle left of a blue square" from its mirror
  image; ``near_misses`` puts one-attribute variants of each pair's scene into its batch as hard
  negatives. ``same_scene_positives`` (count same-scene pairs in a batch as matches) is a switch,
  off because it scored lower in a trial.
* The world-v2 recipe pools the image by the mean of its patch tokens (``vision_pool="avg"``). MacCap reads the
  projected patch tokens, and only what is pooled is trained to meet the text: a 3-layer ViT pooled by its CLS
  token leaves them unaligned (real CLIP's, after 12 layers, carry the CLS token's semantics).

Training runs through the shared loop (:mod:`training.loop`); every caption is a fresh paraphrase
of its scene each time it is drawn. Images are used at the size they are drawn, so the training
pixels are ``encoder.preprocess`` exactly, computed from uint8 tensors without PIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from capdemo.config import Config, ConfigError
from capdemo.encoders import ClipEncoder, EncoderConfig, ImageFeatures
from capdemo.gap import gap_report
from capdemo.methods.maccap.model import MacCapConfig
from training.loop import TrainConfig, TrainResult, TrainTask, train
from training.shapes.metrics import selection_on_objects
from training.shapes.stage_pool import clocks, seconds_since
from training.shapes.world import (
    COUNT_WORDS,
    PAIR_RELATIONS,
    POSITION_PHRASES,
    SIZES,
    Scene,
    SceneError,
    Unmentioned,
    WorldConfig,
    all_scenes,
    attribute_accuracy,
    captions,
    generate_covered_pairs,
    generate_pairs,
    generate_pairs_with_unmentioned,
    render_with_unmentioned,
    sample_scene,
)

SHAPES_CLIP_NAME = "shapes-tiny-clip"
_ENCODE_CHUNK = 512  # images or texts per forward pass when embedding for evaluation


def _default_train_config() -> TrainConfig:
    return TrainConfig(out_dir="runs/shapes/clip", batch_size=256, epochs=5, lr=2e-3, warmup_steps=50,
                       weight_decay=0.1, checkpoint_every=0, keep_checkpoints=1, log_every=20)


@dataclass
class TinyClipConfig(Config):
    """Architecture and training recipe of the shapes world's CLIP."""

    embed_dim: int = 256  # D, the joint image-text space (ViT-B/32: 512; the gap grows with D, Fahim et al. 2024)
    # Input side in pixels. Training draws the world at this size (WorldConfig.image_size must match);
    # the app resizes any image to it.
    image_size: int = 56
    patch_size: int = 8  # ViT patch side; 56 / 8 gives ViT-B/32's 7x7 grid (49 patches + CLS)
    vision_width: int = 96  # ViT hidden width
    vision_layers: int = 3  # ViT blocks
    vision_head_width: int = 32  # width per attention head (heads = vision_width / vision_head_width)
    # How the ViT pools its tokens into the image embedding: "tok" = the CLS token (OpenAI's CLIP), "avg" = the mean
    # of the patch tokens (open_clip's pool_type). Only what is pooled is trained to meet the text: with "tok" a
    # tiny ViT's projected patch tokens never are, so no subregion can be closer to a caption than the image.
    vision_pool: str = "tok"
    # The ViT's position embedding: "learnable" (CLIP's) or "sin_cos_2d" (fixed; open_clip's pos_embed_type). Learned
    # positions let fixed patches become attention sinks, which MacCap's top-N_cr then selects wherever the objects are.
    vision_pos_embed: str = "learnable"
    context_length: int = 20  # text tokens incl. start and end; the world's longest caption needs 15
    # open_clip's standard BPE tokenizer (49408 tokens) is kept so the encoder loads like any other;
    # its vocab_size x text_width token embedding is most of the file, so the text tower stays narrow.
    text_width: int = 64  # text transformer width
    text_heads: int = 4  # text attention heads
    text_layers: int = 2  # text transformer blocks
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    logit_scale: float = 100.0  # fixed inverse temperature (CLIP's final value); higher keeps more of the gap
    pairs: int = 40_000  # generated (image, caption) training pairs, drawn from WorldConfig.train_seed
    # Count other pairs of the same scene in a batch as matches (soft targets) instead of negatives.
    # Off by default: in a 48k-sample trial it scored lower (i2t 0.47 against 0.51).
    same_scene_positives: bool = False
    # Hard negatives: each generated pair comes with this many near misses (its scene with one attribute
    # changed, freshly drawn) in the same batch; pairs and train.batch_size count all of them. With 3, at
    # equal cost, zero-shot rose 0.923 -> 0.941 and captions crowding within cosine 0.99 fell 6.5% -> 0.5%.
    near_misses: int = 3
    # Mismatched pairs: this fraction of the training pairs carries the caption of another scene, drawn from the
    # world (web alt-text is often wrong or about something else). Yaras et al. 2024 trace the modality gap to
    # such pairs: they keep the two modalities apart where perfectly matched pairs let training close the gap.
    mismatched: float = 0.0
    # Alt-text detail: each training caption also says each thing its image shows that the world's captions leave
    # out (the background's tone, the clutter, an occluder; world.Unmentioned) with this probability. A caption never
    # says everything its image shows, but web captions taken together say most of it, so real CLIP's image
    # embedding keeps what any one caption leaves out (Schrodi et al. 2024 trace the gap to this information
    # imbalance). At 0 the CLIP learns to ignore what no caption ever mentions. Evaluation uses the plain captions.
    detail: float = 0.0
    # Detail misses: each generated pair also brings this many redraws of its own scene (another background, clutter
    # and occluder) into its batch, so that what the detail says is what tells them apart. Counted in family_size.
    detail_misses: int = 0
    # Image views: an image-to-image InfoNCE term of this weight between each training image and a copy of it shifted
    # by up to half a patch, against the batch's other images (SLIP, Mu et al. 2022). It makes the image embedding
    # keep what tells one picture from another (background, clutter, the exact layout) whether or not a caption
    # says it, as real CLIP's image embedding keeps what its caption leaves out. At 0 the loss is the recipe's.
    image_views: float = 0.0
    image_views_scale: float = 10.0  # that term's inverse temperature (SimCLR's 1 / 0.1)
    round_to_fp16: bool = True  # round the trained weights to float16 values, so a bundle can store them in
    #                             half the bytes and load back bit-identical in float32
    init_seed: int = 0  # seed of the random initialisation
    threads: int = 2  # torch CPU threads while training
    train: TrainConfig = field(default_factory=_default_train_config)  # optimiser, schedule, batch, epochs

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.vision_width % self.vision_head_width:
            raise ConfigError(f"TinyClipConfig: image_size {self.image_size} must be a multiple of patch_size "
                              f"{self.patch_size}, and vision_width {self.vision_width} of vision_head_width "
                              f"{self.vision_head_width}")
        if self.text_width % self.text_heads:
            raise ConfigError(f"TinyClipConfig: text_width {self.text_width} must be a multiple of text_heads "
                              f"{self.text_heads}")
        if min(self.near_misses, self.detail_misses) < 0:
            raise ConfigError(f"TinyClipConfig: near_misses and detail_misses must be >= 0, got {self.near_misses}, "
                              f"{self.detail_misses}")
        if self.train.batch_size % self.family_size or self.pairs % self.family_size:
            raise ConfigError(f"TinyClipConfig: pairs {self.pairs} and train.batch_size {self.train.batch_size} "
                              f"must be multiples of 1 + near_misses + detail_misses = {self.family_size}")
        if self.vision_pool not in ("tok", "avg"):
            raise ConfigError(f"TinyClipConfig.vision_pool must be 'tok' or 'avg', got {self.vision_pool!r}")
        if self.vision_pos_embed not in ("learnable", "sin_cos_2d"):
            raise ConfigError(f"TinyClipConfig.vision_pos_embed must be 'learnable' or 'sin_cos_2d', "
                              f"got {self.vision_pos_embed!r}")
        if not 0 <= self.mismatched < 1:
            raise ConfigError(f"TinyClipConfig.mismatched must be a fraction in [0, 1), got {self.mismatched}")
        if not 0 <= self.detail <= 1:
            raise ConfigError(f"TinyClipConfig.detail must be a probability, got {self.detail}")
        if self.image_views < 0 or not self.image_views_scale > 0:
            raise ConfigError(f"TinyClipConfig needs image_views >= 0 and image_views_scale > 0, got "
                              f"{self.image_views}, {self.image_views_scale}")
        if not self.logit_scale > 0 or self.pairs < self.train.batch_size or self.threads < 1:
            raise ConfigError(f"TinyClipConfig needs logit_scale > 0, pairs >= train.batch_size and threads >= 1, "
                              f"got {self.logit_scale}, {self.pairs} < {self.train.batch_size}, {self.threads}")

    @property
    def family_size(self) -> int:
        """Pairs that always share a batch: a generated pair and its near misses."""
        return 1 + self.near_misses + self.detail_misses

    @classmethod
    def smoke(cls, **train_overrides: Any) -> TinyClipConfig:
        """A CI-sized run (~20-30 s on two cores): narrower, fewer pairs; the gap is still CLIP-like."""
        smoke_train = {"batch_size": 128, "epochs": 4, "lr": 3e-3, "warmup_steps": 10}
        train_config = _default_train_config().replace(**{**smoke_train, **train_overrides})
        return cls(vision_width=64, vision_layers=2, pairs=4_000, train=train_config)

    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip architecture dict (registered under SHAPES_CLIP_NAME when the encoder is built)."""
        return {
            "embed_dim": self.embed_dim,
            "init_logit_scale": math.log(self.logit_scale),
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": self.vision_head_width,
                           # "tok" is open_clip's default: left out, so world v1's encoder config is unchanged
                           **({"pool_type": self.vision_pool} if self.vision_pool != "tok" else {}),
                           # likewise: the shipped encoders' configs stay as they are
                           **({"pos_embed_type": self.vision_pos_embed}
                              if self.vision_pos_embed != "learnable" else {})},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers},
        }

    def encoder_config(self) -> EncoderConfig:
        """How capdemo builds this CLIP: randomly initialised here, weights from the bundle in the app."""
        return EncoderConfig(model_name=SHAPES_CLIP_NAME, pretrained=None, model_config=self.open_clip_config())


def build_encoder(config: TinyClipConfig) -> tuple[ClipEncoder, EncoderConfig]:
    """A randomly initialised (seeded) tiny CLIP, built through the same path the app uses."""
    encoder_config = config.encoder_config()
    with torch.random.fork_rng():
        torch.manual_seed(config.init_seed)
        encoder = ClipEncoder.from_config(encoder_config)
    return encoder, encoder_config


# Pixels


def uint8_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> (N, 3, H, W) uint8, the compact form training keeps in memory."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def normalise_pixels(pixels: torch.Tensor, encoder_model: torch.nn.Module) -> torch.Tensor:
    """(N, 3, H, W) uint8 at the model's input size -> float32 model input, equal to ``encoder.preprocess``.

    open_clip's transform resizes (a no-op at the input size), scales to [0, 1] and normalises with
    the model's mean and std; the same operations in the same order give the same bits.
    """
    preprocess = encoder_model.visual.preprocess_cfg
    expected = tuple(preprocess["size"])
    if tuple(pixels.shape[-2:]) != expected:
        raise ValueError(f"pixels are {tuple(pixels.shape[-2:])} but the CLIP takes {expected}; draw the world "
                         "at the CLIP's image_size")
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    return pixels.float().div(255).sub(mean).div(std)


# Training data


def near_miss(scene: Scene, rng: np.random.Generator, *, world: WorldConfig) -> Scene:
    """``scene`` with one attribute changed: the attribute uniformly among those that can change, then its value.

    A pair can also swap its objects (same objects, mirrored), the hardest case for a CLIP.
    """
    def others(values: Sequence[Any], current: Any) -> list[Any]:
        return [value for value in values if value != current]

    colours = [{"colour": c} for c in others(world.colours, scene.colour)]
    shapes = [{"shape": s} for s in others(world.shapes, scene.shape)]
    if scene.kind == "single":
        changes = {"colour": colours, "shape": shapes, "size": [{"size": s} for s in others(SIZES, scene.size)],
                   "position": [{"position": p} for p in others(tuple(POSITION_PHRASES), scene.position)]}
    elif scene.kind == "pair":
        changes = {"colour": colours + [{"colour2": c} for c in others(world.colours, scene.colour2)],
                   "shape": shapes + [{"shape2": s} for s in others(world.shapes, scene.shape2)],
                   "order": [{"colour": scene.colour2, "shape": scene.shape2, "colour2": scene.colour,
                              "shape2": scene.shape}],
                   "relation": [{"relation": r} for r in others(PAIR_RELATIONS, scene.relation)]}
    else:
        changes = {"colour": colours, "shape": shapes,
                   "count": [{"count": n} for n in others(tuple(COUNT_WORDS), scene.count)]}
    options = [variants for variants in (_valid_variants(scene, each) for each in changes.values()) if variants]
    variants = options[rng.integers(len(options))]
    return variants[rng.integers(len(variants))]


def _valid_variants(scene: Scene, changes: list[dict[str, Any]]) -> list[Scene]:
    """``scene`` with each of ``changes`` applied, leaving out those that are no valid scene."""
    variants = []
    for change in changes:
        try:
            variants.append(replace(scene, **change))
        except SceneError:  # e.g. a pair whose two objects would become equal
            pass
    return variants


def generate_training_pairs(config: TinyClipConfig, *, world: WorldConfig
                            ) -> list[tuple[Scene, Image.Image, str]]:
    """``config.pairs`` (caption scene, image, detail) triples in families: a world pair (WorldConfig.train_seed)
    then its near misses. A ``config.mismatched`` fraction of them pairs the image with another scene's captions.
    The detail is what the pair's captions add to the scene's (``config.detail``): "" or ", " and phrases."""
    anchors = generate_pairs_with_unmentioned(config.pairs // config.family_size, seed=world.train_seed,
                                              config=world)
    rng = np.random.default_rng([world.train_seed, config.near_misses])  # near misses: a stream of their own
    pairs: list[tuple[Scene, Image.Image, Unmentioned]] = []
    for scene, image, _, unmentioned in anchors:
        pairs.append((scene, image, unmentioned))
        for _ in range(config.near_misses):
            variant = near_miss(scene, rng, world=world)
            pairs.append((variant, *render_with_unmentioned(variant, rng, config=world)))
        for _ in range(config.detail_misses):
            pairs.append((scene, *render_with_unmentioned(scene, rng, config=world)))
    if config.mismatched:
        wrong = np.random.default_rng([world.train_seed, 1 + config.near_misses])  # a stream of its own
        flips = wrong.random(len(pairs)) < config.mismatched
        pairs = [(sample_scene(wrong, config=world) if flip else scene, image, unmentioned)
                 for flip, (scene, image, unmentioned) in zip(flips, pairs)]
    if not config.detail:
        return [(scene, image, "") for scene, image, _ in pairs]
    told = np.random.default_rng([world.train_seed, 2 + config.near_misses])  # a stream of its own
    return [(scene, image, "".join(f", {phrase}" for phrase in unmentioned.phrases() if told.random() < config.detail))
            for scene, image, unmentioned in pairs]


class ClipPairs(Dataset):
    """Training pairs as uint8 pixels, the paraphrases of each pair's caption and caption ids, served in families.

    A caption is a scene and its detail (what the captions add to the scene's; "" for most): pairs that share both
    share an id. Item i is the ``family_size`` consecutive pairs from i * family_size on (a pair and its near
    misses), so they always share a batch. The caption is drawn per step from the paraphrases (see the loss).
    """

    def __init__(self, pairs: Sequence[tuple[Scene, Image.Image, str]], tokenizer: Any, *, family_size: int = 1):
        if not pairs or len(pairs) % family_size:
            raise ValueError(f"need a non-empty multiple of family_size={family_size} pairs, got {len(pairs)}")
        caption_ids: dict[tuple[Scene, str], int] = {}
        self.scene = torch.tensor([caption_ids.setdefault((scene, detail), len(caption_ids))
                                   for scene, _, detail in pairs])  # (N,)
        paraphrases = [[text + detail for text in captions(scene)] for scene, detail in caption_ids]  # in id order
        most = max(map(len, paraphrases))
        every = [text for texts in paraphrases for text in texts]
        tokens = tokenizer(every)  # (sum of counts, L)
        cut = tokenizer(every, context_length=tokens.shape[1] + 1)[:, -1] != 0  # (sum of counts,) one token longer
        if bool(cut.any()):  # the tokenizer cuts what does not fit, silently
            raise ConfigError(f"a training caption does not fit the CLIP's context of {tokens.shape[1]} tokens "
                              f"(e.g. {every[int(cut.nonzero()[0])]!r}); raise TinyClipConfig.context_length")
        bank = torch.zeros(len(paraphrases), most, tokens.shape[1], dtype=tokens.dtype)  # (S, P, L)
        offset = 0
        for index, texts in enumerate(paraphrases):
            bank[index, : len(texts)] = tokens[offset : offset + len(texts)]
            offset += len(texts)
        self.scene_captions = bank  # (S, P, L), rows past a scene's paraphrase count are zeros
        self.scene_caption_count = torch.tensor([len(texts) for texts in paraphrases])  # (S,)
        self.pixels = uint8_pixels([image for _, image, _ in pairs])  # (N, 3, H, W) uint8
        self.family_size = family_size

    def __len__(self) -> int:
        return len(self.scene) // self.family_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = slice(index * self.family_size, (index + 1) * self.family_size)
        scene = self.scene[rows]  # (F,)
        return {"pixels": self.pixels[rows], "captions": self.scene_captions[scene],
                "caption_count": self.scene_caption_count[scene], "scene": scene}


def collate_pairs(families: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate families: pixels (B, 3, H, W) uint8, captions (B, P, L), caption_count (B,), scene (B,)."""
    return {key: torch.cat([family[key] for family in families]) for key in families[0]}


def contrastive_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, same_scene_positives: bool,
                     image_views: float = 0.0, image_views_scale: float = TinyClipConfig.image_views_scale
                     ) -> torch.Tensor:
    """Symmetric InfoNCE at the model's (fixed) logit scale, with a paraphrase drawn per pair, plus ``image_views``
    times an image-to-image InfoNCE between each image and a shifted view of it (TinyClipConfig.image_views).

    The paraphrase and the shifts come from torch's generator, which the loop seeds per step, so runs repeat.
    """
    batch_size = batch["scene"].shape[0]
    rows = torch.arange(batch_size)
    choice = (torch.rand(batch_size) * batch["caption_count"]).long()  # (B,) one paraphrase each
    tokens = batch["captions"][rows, choice]  # (B, L)
    pixels = normalise_pixels(batch["pixels"], model)  # (B, 3, H, W)
    images = model.encode_image(pixels, normalize=True)  # (B, D)
    texts = model.encode_text(tokens, normalize=True)  # (B, D)
    logits = model.logit_scale.exp() * images @ texts.T  # (B, B) image i against text j
    if same_scene_positives:
        matches = (batch["scene"][:, None] == batch["scene"][None, :]).float()  # (B, B), symmetric
        targets = matches / matches.sum(dim=1, keepdim=True)  # each row a distribution over its matches
    else:
        targets = torch.eye(batch_size)
    # targets is symmetric, so it also serves the text-to-image direction (the transposed logits)
    loss = symmetric_cross_entropy(logits, targets)
    if image_views:
        patch = model.visual.patch_size[0]
        views = model.encode_image(shifted(pixels, patch // 2), normalize=True)  # (B, D)
        view_logits = image_views_scale * images @ views.T  # (B, B) image i against the view of image j
        loss = loss + image_views * symmetric_cross_entropy(view_logits, rows)
    return loss


def symmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """InfoNCE in both directions of a (B, B) score matrix: the mean of the rows' and the columns' cross-entropy
    against ``targets``, which serve both directions (class indices (B,), or a symmetric (B, B) distribution)."""
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def shifted(pixels: torch.Tensor, reach: int) -> torch.Tensor:
    """(B, C, H, W) -> the same images, each moved by its own random offset of at most ``reach`` pixels along each
    axis (torch's generator), the uncovered border filled by repeating the edge."""
    height, width = pixels.shape[-2:]
    padded = F.pad(pixels, (reach, reach, reach, reach), mode="replicate")  # (B, C, H + 2r, W + 2r)
    offsets = torch.randint(0, 2 * reach + 1, (pixels.shape[0], 2)).tolist()  # (B, 2) top, left
    return torch.stack([image[:, top : top + height, left : left + width]
                        for image, (top, left) in zip(padded, offsets)])


# Evaluation


@torch.inference_mode()
def embed_images(encoder: ClipEncoder, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, D) normalised image embeddings through the app's path (encoder.preprocess), in chunks."""
    chunks = [encoder.encode_image_embeds(encoder.preprocess(images[start : start + _ENCODE_CHUNK]))
              for start in range(0, len(images), _ENCODE_CHUNK)]
    return torch.cat(chunks)


@torch.inference_mode()
def embed_texts(encoder: ClipEncoder, texts: Sequence[str]) -> torch.Tensor:
    """(N, D) normalised text embeddings, in chunks."""
    return torch.cat([encoder.encode_text(texts[start : start + _ENCODE_CHUNK])
                      for start in range(0, len(texts), _ENCODE_CHUNK)])


def _scene_ids(scenes: Sequence[Scene], catalogue: dict[Scene, int]) -> torch.Tensor:
    return torch.tensor([catalogue[scene] for scene in scenes])


def evaluate_clip(encoder: ClipEncoder, *, world: WorldConfig, n: int = 1000, seed: int | None = None,
                  n_reference: int = 4000, reference_seed: int | None = None) -> dict[str, Any]:
    """Retrieval, zero-shot and modality-gap metrics on ``n`` held-out pairs (seed: world.test_seed).

    Retrieval counts a hit when the retrieved item shows the query's scene (paraphrases and repeated
    scenes are right answers):

    - ``i2t`` / ``t2i``: top-1 among the n test captions / images;
    - ``zero_shot``: the image's nearest canonical caption among all scenes of the world, and
      ``zero_shot_attributes``, the per-attribute accuracy of those predictions;
    - ``image_nn``: the scene of the nearest of ``n_reference`` other images (seed:
      world.unpaired_seed): how well image embeddings alone separate scenes (it grows with
      ``n_reference``, as more references share the query's scene);
    - ``text_crowding``: fraction of scenes whose canonical caption has another scene's caption at
      cosine > 0.99;
    - ``gap``: :func:`capdemo.gap.gap_report` of the paired test embeddings (without the per-dimension
      list), plus the norms of the two modality means;
    - ``selection``: where MacCap's selection of the paper's N_cr = 10 patches lands on the test images
      (:func:`training.shapes.metrics.selection_on_objects`), for CLIP trials that change what the heatmap shows.
    """
    if n < 4:
        raise ValueError(f"evaluate_clip needs n >= 4 test pairs, got {n}")
    catalogue = {scene: index for index, scene in enumerate(all_scenes(world))}
    covered = generate_covered_pairs(n, seed=world.test_seed if seed is None else seed, config=world)
    test = [(scene, image, caption) for scene, image, caption, _ in covered]
    reference = generate_pairs(n_reference, seed=world.unpaired_seed if reference_seed is None else reference_seed,
                               config=world)
    scenes = [scene for scene, _, _ in test]
    truth = _scene_ids(scenes, catalogue)  # (n,)
    images = embed_images(encoder, [image for _, image, _ in test])  # (n, D)
    selection = _selection_on_objects(encoder, [image for _, image, _ in test], [cover for *_, cover in covered])
    texts = embed_texts(encoder, [text for _, _, text in test])  # (n, D)
    canonical = embed_texts(encoder, [captions(scene)[0] for scene in catalogue])  # (S, D)
    reference_images = embed_images(encoder, [image for _, image, _ in reference])  # (R, D)

    same_scene = truth[:, None] == truth[None, :]  # (n, n)
    similarity = images @ texts.T  # (n, n) image i against text j
    predicted = (images @ canonical.T).argmax(dim=1)  # (n,) index into the catalogue
    nearest_reference = (images @ reference_images.T).argmax(dim=1)  # (n,)
    reference_truth = _scene_ids([scene for scene, _, _ in reference], catalogue)  # (R,)
    caption_similarity = canonical @ canonical.T  # (S, S)
    caption_similarity.fill_diagonal_(-1.0)
    scene_list = list(catalogue)
    gap = gap_report(images, texts, paired=True)
    gap.pop("std_ratio_per_dim")
    return {
        "n": n,
        "i2t": same_scene[torch.arange(n), similarity.argmax(dim=1)].float().mean().item(),
        "t2i": same_scene[similarity.argmax(dim=0), torch.arange(n)].float().mean().item(),
        "zero_shot": (predicted == truth).float().mean().item(),
        "zero_shot_attributes": attribute_accuracy([captions(scene_list[i])[0] for i in predicted.tolist()], scenes),
        "image_nn": (reference_truth[nearest_reference] == truth).float().mean().item(),
        "text_crowding": (caption_similarity.max(dim=1).values > 0.99).float().mean().item(),
        "gap": {**gap, "image_mean_norm": images.mean(dim=0).norm().item(),
                "text_mean_norm": texts.mean(dim=0).norm().item()},
        "selection": selection,
    }


@torch.inference_mode()
def _selection_on_objects(encoder: ClipEncoder, images: Sequence[Image.Image],
                          coverage: Sequence[np.ndarray]) -> dict[str, float]:
    """:func:`training.shapes.metrics.selection_on_objects` of MacCap's default N_cr (the paper's 10) on ``images``
    (encoded in chunks) with their object ``coverage``."""
    features = ImageFeatures.cat([encoder.encode_images(encoder.preprocess(images[start: start + _ENCODE_CHUNK]))
                                  for start in range(0, len(images), _ENCODE_CHUNK)])
    cover = torch.stack([torch.from_numpy(c) for c in coverage])  # (n, S, S)
    return selection_on_objects(features, cover, MacCapConfig().n_cr)


# Training


def train_clip(config: TinyClipConfig, *, world: WorldConfig, resume: bool = False, evaluate: bool = True
               ) -> tuple[ClipEncoder, EncoderConfig, dict[str, Any]]:
    """Generate pairs, train the tiny CLIP through the shared loop and (optionally) evaluate it.

    Returns the frozen encoder (eval mode, no gradients), the EncoderConfig that rebuilds it, and
    metrics: timings (wall and CPU seconds of data generation and training), the final training
    loss and, with ``evaluate``, :func:`evaluate_clip` on the world's test split.
    """
    if world.image_size != config.image_size:
        raise ConfigError(f"the world draws {world.image_size}px images but the CLIP takes {config.image_size}px; "
                          "set TinyClipConfig.image_size to WorldConfig.image_size")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        encoder, encoder_config = build_encoder(config)
        start = clocks()
        dataset = ClipPairs(generate_training_pairs(config, world=world), encoder.tokenizer,
                            family_size=config.family_size)
        timings = {"data": seconds_since(start)}
        start = clocks()
        result = _fit(encoder, dataset, config, resume=resume)
        timings["train"] = seconds_since(start)
        metrics: dict[str, Any] = {"timings": timings, "steps": result.step,
                                   "final_loss": result.history[-1]["loss"] if result.history else None}
        if evaluate:
            start = clocks()
            metrics["eval"] = evaluate_clip(encoder, world=world)
            timings["eval"] = seconds_since(start)
    finally:
        torch.set_num_threads(threads)
    return encoder, encoder_config, metrics


def _fit(encoder: ClipEncoder, dataset: ClipPairs, config: TinyClipConfig, *, resume: bool) -> TrainResult:
    """Train ``encoder.model`` in place (logit scale and a fixed position embedding frozen), then freeze it again."""
    model = encoder.model
    model.requires_grad_(True)
    model.logit_scale.requires_grad_(False)
    if config.vision_pos_embed != "learnable":
        model.visual.positional_embedding.requires_grad_(False)

    def loss_fn(bare_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return contrastive_loss(bare_model, batch, same_scene_positives=config.same_scene_positives,
                                image_views=config.image_views, image_views_scale=config.image_views_scale)

    task = TrainTask(model=model, dataset=dataset, collate_fn=collate_pairs, loss_fn=loss_fn)
    families_per_batch = config.train.batch_size // config.family_size  # the loop's batches count dataset items
    try:
        result = train(task, config.train.replace(batch_size=families_per_batch), resume=resume)
    finally:
        model.eval().requires_grad_(False)
    if config.round_to_fp16:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half())
    return result


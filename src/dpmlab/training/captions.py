"""Captioned MNIST for text-to-image training: attributes measured on each image, a caption grammar
over them, and a word-level tokenizer that ``transformers`` loads from files.

Attributes (pure functions of the pixels, on 28x28 images in ``[-1, 1]``; 32x32 padded images are
centre-cropped first):

* **ink mass** — mean ink ``(x + 1) / 2`` over the image. **Thickness** is the per-digit tertile of the
  ink mass on the training split: ``thin`` (lowest third), ``regular``, ``bold`` (highest third).
  Per digit, because a ``1`` carries half the ink of an ``8`` at the same stroke width.
* **slant** — the shear of the ink's second moments, ``mu11 / mu02`` with ``x`` to the right and ``y``
  up: the horizontal shift of the stroke per unit height (0 upright, > 0 leaning right). Classes
  ``left`` (< 0), ``upright`` (0 ... 0.25), ``right`` (> 0.25): roughly the global tertiles of MNIST.

Captions: ``"a [thin|bold] [left slanted|right slanted|slanted|upright] <digit>"`` where ``<digit>`` is
a number word (``zero`` ... ``nine``) or ``digit``. Every attribute may be left out, so ``"a seven"``
means any seven and a negative prompt such as ``"bold"`` names one attribute alone; ``slanted`` means
left or right. Training draws, per example and step, which words to state (``caption_ids``). The
``CAPTIONS`` table enumerates every caption the grammar makes (the text encoder's outputs for all of
them fit in a small lookup table).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DIGIT_WORDS",
    "THICKNESS",
    "SLANT",
    "VOCAB",
    "CONTEXT_LENGTH",
    "CAPTIONS",
    "SLANT_LIMITS",
    "INK_TERTILES",
    "CaptionSpec",
    "CaptionedMNIST",
    "ink_mass",
    "slant",
    "thickness_class",
    "slant_class",
    "parse_caption",
    "caption_consistency",
    "draw_caption_ids",
    "captioned_mnist",
    "build_tokenizer",
    "check_prompt",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "regular", "bold")  # class 1 (regular) has no caption word
SLANT = ("left", "upright", "right")
SLANT_LIMITS = (0.0, 0.25)  # shear below the first: left; above the second: right
# Per-digit ink-mass tertiles (1/3, 2/3) of the MNIST-5k training split (mnist_5k_split: 4,500 images),
# measured by ``ink_mass``; tests/test_captions.py recomputes them from the data.
INK_TERTILES = (
    (0.1591, 0.1932),
    (0.0666, 0.0824),
    (0.1311, 0.1625),
    (0.1281, 0.1557),
    (0.1042, 0.1295),
    (0.1080, 0.1401),
    (0.1150, 0.1465),
    (0.1017, 0.1260),
    (0.1312, 0.1613),
    (0.1041, 0.1292),
)
SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<unk>")  # ids 0, 1, 2: bos, eos (= pad), unknown
VOCAB = (*SPECIAL, "a", "thin", "bold", "left", "right", "slanted", "upright", "digit", *DIGIT_WORDS)
CONTEXT_LENGTH = 10  # tokens, bos and eos included: the text encoder's max_position_embeddings

_THICK_WORDS = (None, "thin", "bold")
_SLANT_PHRASES = (None, "left slanted", "right slanted", "slanted", "upright")
_NOUNS = (*DIGIT_WORDS, "digit")


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption states: ``digit`` 0-9, ``thickness`` index into ``THICKNESS``, ``slant`` one of
    ``"left"``, ``"upright"``, ``"right"``, ``"slanted"`` (left or right); ``None`` = not stated."""

    digit: int | None = None
    thickness: int | None = None
    slant: str | None = None

    def text(self) -> str:
        words = ["a"]
        if self.thickness is not None:
            if self.thickness == 1:
                raise ValueError("regular thickness has no caption word")
            words.append(THICKNESS[self.thickness])
        if self.slant is not None:
            words.append({"left": "left slanted", "right": "right slanted"}.get(self.slant, self.slant))
        words.append("digit" if self.digit is None else DIGIT_WORDS[self.digit])
        return " ".join(words)

    def matches(self, digit: int, thickness: int, slant: int) -> bool:
        """Whether an image with these measured classes satisfies the caption."""
        if self.digit is not None and self.digit != digit:
            return False
        if self.thickness is not None and self.thickness != thickness:
            return False
        if self.slant == "slanted":
            return slant != 1
        return self.slant is None or SLANT.index(self.slant) == slant


def _all_specs() -> tuple[CaptionSpec, ...]:
    out = []
    for tw, sp, noun in itertools.product(_THICK_WORDS, _SLANT_PHRASES, _NOUNS):
        out.append(
            CaptionSpec(
                digit=None if noun == "digit" else DIGIT_WORDS.index(noun),
                thickness=None if tw is None else THICKNESS.index(tw),
                slant=None if sp is None else sp.split()[0],
            )
        )
    return tuple(out)


SPECS = _all_specs()
CAPTIONS = ("", *(s.text() for s in SPECS))  # id 0: the empty caption (classifier-free guidance)


# --- attribute measurements ----------------------------------------------------------------------
def _ink(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] not in ((28, 28), (32, 32)):
        raise ValueError(f"images must be (N, 1, 28, 28) or (N, 1, 32, 32), got {tuple(images.shape)}")
    if images.shape[-1] == 32:
        images = images[..., 2:30, 2:30]
    return ((images.double() + 1) / 2).clamp(0, 1)[:, 0]


def ink_mass(images: Tensor) -> Tensor:
    """Mean ink per pixel in ``[0, 1]`` of each image, ``(N,)`` float64."""
    return _ink(images).mean((1, 2))


def slant(images: Tensor) -> Tensor:
    """Shear ``mu11 / mu02`` of the ink (x right, y up): > 0 leans right, ``(N,)`` float64. A blank
    image has slant 0."""
    w = _ink(images)
    h, wd = w.shape[-2:]
    ys = -torch.arange(h, dtype=torch.float64).view(1, h, 1)  # up is positive
    xs = torch.arange(wd, dtype=torch.float64).view(1, 1, wd)
    m = w.sum((1, 2)).clamp_min(1e-12)
    dy = ys - ((w * ys).sum((1, 2)) / m).view(-1, 1, 1)
    dx = xs - ((w * xs).sum((1, 2)) / m).view(-1, 1, 1)
    mu02 = (w * dy * dy).sum((1, 2)) / m
    return torch.where(mu02 > 1e-9, (w * dx * dy).sum((1, 2)) / m / mu02.clamp_min(1e-9), torch.zeros_like(mu02))


def thickness_class(images: Tensor, digits: Tensor) -> Tensor:
    """0 thin, 1 regular, 2 bold: the image's ink mass against its digit's tertiles, ``(N,)`` int64."""
    digits = torch.as_tensor(digits, dtype=torch.int64)
    if digits.shape != (images.shape[0],) or bool(((digits < 0) | (digits > 9)).any()):
        raise ValueError(f"digits must be ({images.shape[0]},) ints in 0..9, got {tuple(digits.shape)}")
    q = torch.tensor(INK_TERTILES, dtype=torch.float64)[digits]
    m = ink_mass(images)
    return (m > q[:, 0]).long() + (m > q[:, 1]).long()


def slant_class(images: Tensor) -> Tensor:
    """0 left, 1 upright, 2 right (``SLANT_LIMITS``), ``(N,)`` int64."""
    s = slant(images)
    return (s >= SLANT_LIMITS[0]).long() + (s > SLANT_LIMITS[1]).long()


# --- captions ------------------------------------------------------------------------------------
def check_prompt(prompt: str) -> list[str]:
    """The prompt's words (lower-cased, ``-`` and ``,`` as spaces), or a ``ValueError`` naming a word
    outside the vocabulary or a prompt longer than the context."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().replace("-", " ").replace(",", " ").replace(".", " ").split()
    for w in words:
        if w not in VOCAB or w in SPECIAL:
            allowed = ", ".join(v for v in VOCAB if v not in SPECIAL)
            raise ValueError(f"word {w!r} of prompt {prompt!r} is not in the model's vocabulary; allowed: {allowed}")
    if len(words) + 2 > CONTEXT_LENGTH:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; the context holds {CONTEXT_LENGTH - 2}")
    return words


def parse_caption(prompt: str) -> CaptionSpec:
    """What a prompt asks for (``CaptionSpec``); words may come in any order. Conflicting words (two
    digits, thin and bold) raise ``ValueError``."""
    words = check_prompt(prompt)
    digit = thick = sl = None

    def put(old: Any, new: Any, what: str) -> Any:
        if old is not None and old != new:
            raise ValueError(f"prompt {prompt!r} names two {what}s: {old!r} and {new!r}")
        return new

    for w in words:
        if w in DIGIT_WORDS:
            digit = put(digit, DIGIT_WORDS.index(w), "digit")
        elif w in ("thin", "bold"):
            thick = put(thick, THICKNESS.index(w), "thickness")
    side = [w for w in words if w in ("left", "right")]
    if len(set(side)) > 1:
        raise ValueError(f"prompt {prompt!r} names two slants: left and right")
    if side:
        sl = side[0]
    if "upright" in words:
        sl = put(sl, "upright", "slant")
    elif "slanted" in words and sl is None:
        sl = "slanted"
    return CaptionSpec(digit, thick, sl)


def caption_consistency(attrs: Tensor) -> Tensor:
    """``(N, len(CAPTIONS))`` bool: does image ``i`` (``attrs[i] = (digit, thickness, slant)``) satisfy
    caption ``j``? The empty caption is satisfied by every image."""
    a = attrs.long()
    d, k, s = a[:, 0:1], a[:, 1:2], a[:, 2:3]
    spec_d = torch.tensor([-1 if c.digit is None else c.digit for c in SPECS])
    spec_k = torch.tensor([-1 if c.thickness is None else c.thickness for c in SPECS])
    code = {None: -1, "left": 0, "upright": 1, "right": 2, "slanted": 3}
    spec_s = torch.tensor([code[c.slant] for c in SPECS])
    ok = ((spec_d < 0) | (spec_d == d)) & ((spec_k < 0) | (spec_k == k))
    ok &= (spec_s < 0) | (spec_s == s) | ((spec_s == 3) & (s != 1))
    return torch.cat([torch.ones_like(ok[:, :1]), ok], 1)


def draw_caption_ids(
    attrs: Tensor, g: torch.Generator, *, p_attr: float = 0.7, p_generic: float = 0.1, p_plain_slanted: float = 0.3
) -> Tensor:
    """One caption id per image (index into ``CAPTIONS``, never the empty one): each measured attribute
    is stated with probability ``p_attr`` (regular thickness has no word), a left/right slant says just
    "slanted" with probability ``p_plain_slanted``, and the digit is called "digit" with probability
    ``p_generic``. A pure function of ``attrs`` and the generator's state."""
    n = attrs.shape[0]
    u = torch.rand(n, 4, generator=g)
    d, k, s = attrs[:, 0].long(), attrs[:, 1].long(), attrs[:, 2].long()
    noun = torch.where(u[:, 0] < p_generic, 10, d)  # index into _NOUNS
    tw = torch.where((u[:, 1] < p_attr) & (k != 1), torch.where(k == 0, 1, 2), 0)  # index into _THICK_WORDS
    phrase = torch.tensor([1, 4, 2])[s]  # _SLANT_PHRASES: left slanted, upright, right slanted
    phrase = torch.where((s != 1) & (u[:, 2] < p_plain_slanted), 3, phrase)
    phrase = torch.where(u[:, 3] < p_attr, phrase, 0)
    # SPECS is itertools.product(_THICK_WORDS, _SLANT_PHRASES, _NOUNS); +1 skips the empty caption
    return 1 + (tw * len(_SLANT_PHRASES) + phrase) * len(_NOUNS) + noun


@dataclass(frozen=True)
class CaptionedMNIST:
    """MNIST-5k padded to ``(N, 1, 32, 32)`` in ``[-1, 1]`` with measured attributes ``attrs (N, 3)`` =
    (digit, thickness class, slant class) and the fixed split of ``mnist_5k_split`` (last 50 of each
    digit held out)."""

    images: Tensor
    attrs: Tensor
    train_idx: Tensor
    val_idx: Tensor

    def full_captions(self) -> list[str]:
        """The caption stating every measured attribute of each image."""
        out = []
        for d, k, s in self.attrs.tolist():
            out.append(CaptionSpec(d, None if k == 1 else k, SLANT[s]).text())
        return out


def captioned_mnist() -> CaptionedMNIST:
    from ..metrics.features import mnist_5k, mnist_5k_split

    d = mnist_5k()
    attrs = torch.stack([d.labels, thickness_class(d.images, d.labels), slant_class(d.images)], 1)
    images = torch.nn.functional.pad(d.images, (2, 2, 2, 2), value=-1.0)
    train_idx, val_idx = mnist_5k_split(d.labels)
    return CaptionedMNIST(images, attrs, train_idx, val_idx)


def build_tokenizer(out_dir: str | os.PathLike[str] | None = None) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` over ``VOCAB`` (word level, lower-cased, ``-`` ``,``
    ``.`` read as spaces; unknown words become ``<unk>``; ``<|startoftext|> ... <|endoftext|>``; padded
    with ``<|endoftext|>`` as CLIP's tokenizer in Stable Diffusion 1.x). Saved to ``out_dir`` if given,
    where ``PreTrainedTokenizerFast.from_pretrained`` (and diffusers pipelines) load it."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[-,.]"), " ")])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=CONTEXT_LENGTH,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast

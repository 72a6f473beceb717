"""CLIP score: text-image agreement under a CLIP model (Hessel et al., "CLIPScore", EMNLP 2021,
arXiv 2104.08718): ``100 * max(cos(E_img(x), E_txt(c)), 0)`` per (image, prompt) pair, as torchmetrics
and the text-to-image papers report it.

The default CLIP is the one shipped beside ``mnist_t2i`` (``assets/mnist_t2i/clip`` with the model's
tokenizer), trained contrastively on captioned MNIST by ``dpmlab.training.t2i``. Its text tower is the
diffusion model's frozen text encoder, as OpenAI's CLIP is Stable Diffusion 1.x's: report CLIP scores
beside the independent checks (the MNIST classifier, the pixel attribute measurements), not instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["CLIP", "load_clip", "clip_score"]


class CLIP(NamedTuple):
    model: Any  # transformers.CLIPModel
    tokenizer: Any


def load_clip(folder: str | os.PathLike[str] | None = None) -> CLIP:
    """A ``CLIPModel`` from ``folder/clip`` and the tokenizer from ``folder/tokenizer`` (default: the
    shipped ``mnist_t2i`` folder), float32, eval mode."""
    from transformers import AutoTokenizer, CLIPModel

    root = Path(folder) if folder is not None else Path(str(resources.files("dpmlab") / "assets" / "mnist_t2i"))
    for sub in ("clip", "tokenizer"):
        if not (root / sub).is_dir():
            raise ValueError(f"{root}: no {sub}/ folder (a CLIP score needs clip/ and tokenizer/)")
    model = CLIPModel.from_pretrained(str(root / "clip"), dtype=torch.float32, use_safetensors=True)
    return CLIP(model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(str(root / "tokenizer")))


def _features(out: Any) -> Tensor:
    return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


@torch.no_grad()
def clip_score(
    images: Tensor, prompts: str | Sequence[str], clip: CLIP | None = None, *, batch_size: int = 500
) -> Tensor:
    """``(N,)`` CLIP scores of ``images (N, C, H, W)`` in ``[-1, 1]`` (the range the shipped CLIP was
    trained on) against one prompt or ``N`` prompts."""
    clip = clip if clip is not None else load_clip()
    n = images.shape[0]
    texts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(texts) != n:
        raise ValueError(f"got {len(texts)} prompts for {n} images")
    cfg = clip.model.config.vision_config
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be (N, {', '.join(map(str, want))}) for this CLIP, got {tuple(images.shape)}")
    tok = clip.tokenizer
    out = []
    for lo in range(0, n, batch_size):
        ids = tok(
            texts[lo : lo + batch_size],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        t = _features(clip.model.get_text_features(input_ids=ids))
        v = _features(clip.model.get_image_features(pixel_values=images[lo : lo + batch_size].float()))
        out.append(100.0 * (t * v).sum(-1).clamp_min(0))
    return torch.cat(out)

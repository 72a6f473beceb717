"""Training the shipped text-to-image latent model (``mnist_t2i``) with Stable Diffusion's own classes.

Three stages, each an objective on the one trainer (``dpmlab.training.fit``: EMA, atomic checkpoints,
exact resume), run in order by ``train_t2i`` from one recipe (``recipes/t2i/mnist_t2i.json``):

1. **CLIP** (Radford et al. 2021, arXiv 2103.00020): ``transformers.CLIPModel`` with a tiny text tower
   (``CLIPTextModel``) and a tiny ViT image tower, contrastive on (image, caption) pairs of captioned
   MNIST (``dpmlab.training.captions``). Deviation: with a few hundred distinct captions a batch holds
   many true pairs besides the diagonal, so the InfoNCE targets are *multi-positive* — uniform over the
   captions an image satisfies (and the images a caption describes) — instead of the identity.
2. **VAE**: ``diffusers.AutoencoderKL`` on 32x32 padded digits -> 4x8x8 latents; loss = pixel MSE +
   ``kl_weight`` x KL per latent element (SD's autoencoder adds LPIPS and a GAN loss, left out on
   digits). The latent scaling factor is measured as SD's was: ``1 / std`` of posterior samples of the
   training images.
3. **Latent diffusion**: ``diffusers.UNet2DConditionModel`` cross-attending to the frozen CLIP text
   tower's last hidden states (as SD 1.x, no attention mask, padded with end-of-text), on SD's
   schedule (scaled-linear betas 0.00085-0.012, 1000 steps), DDPM's L_simple with the recipe's target
   (v by default, as SD 2), caption drop-out to the empty prompt for classifier-free guidance
   (Ho & Salimans 2022, arXiv 2207.12598).

``assemble`` writes the diffusers-format folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors only) plus ``clip/`` (the full CLIP, for
CLIP scores) and ``model_card.json``. Run: ``python -m dpmlab.training.t2i --recipe
recipes/t2i/mnist_t2i.json --out runs/mnist_t2i [--resume]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import atomic_folder
from ..models.nets import Objective
from ..schedules import DiscreteVP
from .captions import (
    CAPTIONS,
    CONTEXT_LENGTH,
    VOCAB,
    CaptionedMNIST,
    build_tokenizer,
    caption_consistency,
    captioned_mnist,
    draw_caption_ids,
)
from .losses import PredictionLoss
from .trainer import TrainConfig, TrainResult, fit

__all__ = [
    "T2IRecipe",
    "CLIPObjective",
    "VAEObjective",
    "LatentDiffusionObjective",
    "train_t2i",
    "assemble",
    "load_t2i_recipe",
    "tokenize",
    "SCHEDULE",
]

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@dataclass(frozen=True)
class T2IRecipe:
    """Model configs (keyword arguments of the diffusers / transformers classes), loss settings and a
    ``TrainConfig`` per stage."""

    name: str = "mnist_t2i"
    clip: Mapping[str, Any] = field(default_factory=dict)  # {"text": {...}, "vision": {...}, "projection_dim": n}
    vae: Mapping[str, Any] = field(default_factory=dict)  # AutoencoderKL kwargs
    unet: Mapping[str, Any] = field(default_factory=dict)  # UNet2DConditionModel kwargs
    kl_weight: float = 1e-4
    prediction: str = "v"  # "eps" or "v"
    caption_dropout: float = 0.1
    train_clip: TrainConfig = field(default_factory=TrainConfig)
    train_vae: TrainConfig = field(default_factory=TrainConfig)
    train_unet: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T2IRecipe:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown t2i recipe fields: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        d = dict(d)
        for k in ("train_clip", "train_vae", "train_unet"):
            d[k] = TrainConfig(**d.get(k, {}))
        return cls(**d)


def load_t2i_recipe(path: str | os.PathLike[str]) -> T2IRecipe:
    p = Path(path)
    try:
        return T2IRecipe.from_dict(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: not a valid text-to-image recipe ({e})") from None


def tokenize(tokenizer: Any, prompts: list[str]) -> Tensor:
    """``(N, CONTEXT_LENGTH)`` token ids, padded as diffusers' Stable Diffusion pipelines pad."""
    return tokenizer(
        prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


class _Stage:
    """What the three objectives share: the captioned training split and the trainer's protocol."""

    name: str
    module: Any  # a diffusers / transformers model (an nn.Module with their config and methods)

    def __init__(self, data: CaptionedMNIST, settings: Mapping[str, Any]) -> None:
        self.data = data
        self.idx = data.train_idx
        self.settings = _jsonable(settings)

    def __len__(self) -> int:
        return int(self.idx.numel())

    def config(self) -> dict[str, Any]:
        return {"stage": self.name, **self.settings}

    def checkpoint_meta(self) -> dict[str, str]:
        return {}


class CLIPObjective(_Stage):
    """Contrastive image-caption training of a tiny ``transformers.CLIPModel`` (multi-positive targets)."""

    name = "clip"

    def __init__(self, recipe: T2IRecipe, data: CaptionedMNIST) -> None:
        from transformers import CLIPConfig, CLIPModel

        super().__init__(data, {"clip": recipe.clip})
        c = dict(recipe.clip)
        text = {
            "vocab_size": len(VOCAB),
            "max_position_embeddings": CONTEXT_LENGTH,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            **c.get("text", {}),
        }
        vision = {"image_size": 32, "num_channels": 1, **c.get("vision", {})}
        self.module = CLIPModel(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.get("projection_dim", 64))
        )
        self.tokens = tokenize(build_tokenizer(), list(CAPTIONS))

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        ex = self.idx[idx]
        attrs = self.data.attrs[ex]
        return {"images": self.data.images[ex], "attrs": attrs, "caption": draw_caption_ids(attrs, g)}

    def loss(self, module: Any, batch: Mapping[str, Tensor]) -> Tensor:
        txt = module.get_text_features(input_ids=self.tokens.to(batch["caption"].device)[batch["caption"]])
        img = module.get_image_features(pixel_values=batch["images"])
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
        logits = module.logit_scale.exp().clamp(max=100.0) * img @ txt.T
        pos = caption_consistency(batch["attrs"])[:, batch["caption"]].float()  # image i satisfies caption j
        i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        t2i = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        return 0.5 * (i2t + t2i)

    def export(self, ema: Any, out_dir: Path, card: dict[str, Any]) -> Path:
        return _save_pretrained(ema, out_dir / "clip", card)


class VAEObjective(_Stage):
    """``AutoencoderKL``: pixel MSE + ``kl_weight`` x mean KL per latent element."""

    name = "vae"

    def __init__(self, recipe: T2IRecipe, data: CaptionedMNIST) -> None:
        from diffusers import AutoencoderKL

        super().__init__(data, {"vae": recipe.vae, "kl_weight": recipe.kl_weight})
        self.module = AutoencoderKL(**{"in_channels": 1, "out_channels": 1, "sample_size": 32, **recipe.vae})
        self.kl_weight = recipe.kl_weight
        f = 2 ** (len(self.module.config.block_out_channels) - 1)
        self.latent_shape = (self.module.config.latent_channels, 32 // f, 32 // f)

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        x = self.data.images[self.idx[idx]]
        return {"images": x, "noise": torch.randn((x.shape[0], *self.latent_shape), generator=g)}

    def loss(self, module: Any, batch: Mapping[str, Tensor]) -> Tensor:
        x = batch["images"]
        post = module.encode(x).latent_dist
        z = post.mean + post.std * batch["noise"]
        rec = module.decode(z).sample
        kl = post.kl().mean() / math.prod(self.latent_shape)
        return F.mse_loss(rec, x) + self.kl_weight * kl

    def export(self, ema: Any, out_dir: Path, card: dict[str, Any]) -> Path:
        ema.eval()
        x = self.data.images
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            post = _encode(ema, x[self.data.train_idx])
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            scale = float(1.0 / z.std())
            rec = ema.decode(_encode(ema, x[self.data.val_idx]).mode()).sample.clamp(-1, 1)
        mse = (rec - x[self.data.val_idx]).square().flatten(1).mean(1)
        psnr = float((10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean())  # peak-to-peak 2 on [-1, 1]
        ema.register_to_config(scaling_factor=scale)
        card = {**card, "scaling_factor": scale, "heldout_psnr_db": round(psnr, 2)}
        return _save_pretrained(ema, out_dir / "vae", card)


def _encode(vae: Any, x: Tensor, batch: int = 500) -> Any:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.cat([vae.encode(x[i : i + batch]).latent_dist.parameters for i in range(0, len(x), batch)])
    return DiagonalGaussianDistribution(params)


class LatentDiffusionObjective(_Stage):
    """``UNet2DConditionModel`` on scaled VAE latents, conditioned on the frozen text tower's states.
    ``unet``: train this given network (e.g. a pruned one, ``methods.ld_pruner``) instead of a new one built
    from ``recipe.unet``."""

    name = "unet"

    def __init__(
        self, recipe: T2IRecipe, data: CaptionedMNIST, vae: Any, text_encoder: Any, *, unet: Any = None
    ) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__(
            data,
            {
                "unet": recipe.unet,
                "prediction": recipe.prediction,
                "caption_dropout": recipe.caption_dropout,
                "schedule": SCHEDULE,
                "scaling_factor": float(vae.config.scaling_factor),
            },
        )
        self.module = (
            unet
            if unet is not None
            else UNet2DConditionModel(
                **{
                    "sample_size": 8,
                    "in_channels": 4,
                    "out_channels": 4,
                    "cross_attention_dim": text_encoder.config.hidden_size,
                    **recipe.unet,
                }
            )
        )
        with torch.no_grad():
            post = _encode(vae.eval(), data.images[data.train_idx])
            self.text = text_encoder.eval()(tokenize(build_tokenizer(), list(CAPTIONS)))[0]  # (C, L, D)
        self.scale = float(vae.config.scaling_factor)
        self.post_mean, self.post_std = post.mean, post.std
        self.dropout = recipe.caption_dropout
        self.loss_fn = PredictionLoss(DiscreteVP.from_preset("scaled_linear"), Objective(recipe.prediction))

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        ex = self.idx[idx]
        n = idx.shape[0]
        cap = draw_caption_ids(self.data.attrs[ex], g)
        cap = torch.where(torch.rand(n, generator=g) < self.dropout, 0, cap)
        return {
            "mean": self.post_mean[idx],
            "std": self.post_std[idx],
            "noise": torch.randn(self.post_mean[idx].shape, generator=g),
            "t": self.loss_fn.draw(g, n),
            "eps": torch.randn(self.post_mean[idx].shape, generator=g),
            "caption": cap,
        }

    def loss(self, module: Any, batch: Mapping[str, Tensor]) -> Tensor:
        z0 = self.scale * (batch["mean"] + batch["std"] * batch["noise"])
        states = self.text.to(z0.device)[batch["caption"]]

        def net(x: Tensor, t: Tensor, **_: Any) -> Tensor:
            return module(x, t, encoder_hidden_states=states).sample

        return self.loss_fn(net, z0, batch["t"], batch["eps"]).mean()

    def export(self, ema: Any, out_dir: Path, card: dict[str, Any]) -> Path:
        return _save_pretrained(ema, out_dir / "unet", card)


def _save_pretrained(module: Any, folder: Path, card: Mapping[str, Any]) -> Path:
    """``save_pretrained`` (safetensors) into a temporary sibling, then renamed: never half-written."""
    with atomic_folder(folder) as tmp:
        module.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "train_card.json").write_text(json.dumps(_jsonable(card), indent=2) + "\n")
    return folder


def _load_stage(run: Path, name: str) -> Any:
    cls: Any
    if name == "clip":
        from transformers import CLIPModel as cls
    elif name == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        from diffusers import UNet2DConditionModel as cls
    return cls.from_pretrained(str(run / name / name)).eval().requires_grad_(False)


def _text_tower(clip: Any) -> Any:
    """The CLIP model's text tower as a stand-alone ``CLIPTextModel`` (Stable Diffusion's text encoder)."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    return text.eval().requires_grad_(False)


def train_t2i(
    recipe: T2IRecipe,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    stages: tuple[str, ...] = ("clip", "vae", "unet"),
) -> dict[str, TrainResult]:
    """Run the stages in order, each in ``out_dir/<stage>`` (its checkpoint, and the exported EMA weights
    in ``out_dir/<stage>/<stage>``); a stage whose export exists is skipped; ``resume`` continues a
    stopped one from its checkpoint."""

    out = Path(out_dir)
    data = captioned_mnist()
    results = {}
    for stage in stages:
        if (out / stage / stage / "train_card.json").is_file():
            continue  # exported already
        obj: Any
        torch.manual_seed({"clip": recipe.train_clip, "vae": recipe.train_vae}.get(stage, recipe.train_unet).seed)
        if stage == "clip":
            obj, tc = CLIPObjective(recipe, data), recipe.train_clip
        elif stage == "vae":
            obj, tc = VAEObjective(recipe, data), recipe.train_vae
        elif stage == "unet":
            text = _text_tower(_load_stage(out, "clip"))
            obj, tc = LatentDiffusionObjective(recipe, data, _load_stage(out, "vae"), text), recipe.train_unet
        else:
            raise ValueError(f"unknown stage {stage!r}; allowed: clip, vae, unet")
        run = out / stage
        results[stage] = fit(
            obj, tc, run, resume=resume and (run / "checkpoint.safetensors").is_file(), progress=progress
        )
    return results


def assemble(run_dir: str | os.PathLike[str], folder: str | os.PathLike[str], recipe: T2IRecipe) -> Path:
    """Write the diffusers-format folder from the exported stages of ``run_dir``."""
    from diffusers import DPMSolverMultistepScheduler

    run, target = Path(run_dir), Path(folder)
    with atomic_folder(target) as tmp:
        clip = _load_stage(run, "clip")
        _text_tower(clip).to(torch.float16).save_pretrained(str(tmp / "text_encoder"))
        clip.to(torch.float16).save_pretrained(str(tmp / "clip"))
        for stage in ("vae", "unet"):
            _load_stage(run, stage).to(torch.float16).save_pretrained(str(tmp / stage))
        build_tokenizer(tmp / "tokenizer")
        pred = "v_prediction" if recipe.prediction == "v" else "epsilon"
        scheduler: Any = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=pred, steps_offset=1)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        cards = {s: json.loads((run / s / s / "train_card.json").read_text()) for s in ("clip", "vae", "unet")}
        card = {
            "name": recipe.name,
            "prediction": recipe.prediction,
            "schedule": SCHEDULE,
            "weights_dtype": "float16",
            "captions": "dpmlab.training.captions",
            "stages": cards,
        }
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dpmlab.training.t2i", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/t2i/mnist_t2i.json")
    p.add_argument("--out", default="runs/mnist_t2i")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stages", default="clip,vae,unet")
    p.add_argument("--folder", default="", help="write the diffusers-format folder here at the end")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    recipe = load_t2i_recipe(a.recipe)
    train_t2i(recipe, a.out, resume=a.resume, stages=tuple(a.stages.split(",")))
    if a.folder:
        print(assemble(a.out, a.folder, recipe))


if __name__ == "__main__":
    main()

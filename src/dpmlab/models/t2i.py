"""Text-to-image latent models in Stable Diffusion's format as dpmlab ``Denoiser``s.

``load_text_to_image(folder)`` reads a diffusers-format folder (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors only) with diffusers' and
transformers' own classes — the shipped ``mnist_t2i`` or a real Stable Diffusion checkpoint alike —
and returns a ``TextToImage`` denoiser on the latents:

* conditioning ``prompt=`` (a string for every sample, or one per sample) or ``encoder_hidden_states=``
  (``(B, L, D)``, e.g. from ``encode_prompt``); neither is the unconditional model (the empty prompt,
  which training drops 10% of captions to), so ``guidance.Unconditional`` works; prompts are tokenised
  and encoded as diffusers' Stable Diffusion pipelines do (padded to the tokenizer's context, the text
  encoder's last hidden states) and cached per prompt;
* ``guided(scale, negative_prompt="")``: classifier-free guidance with a negative prompt
  (diffusers' ``guidance_scale`` convention; the empty prompt is the unconditional model);
* ``encode(images)`` / ``decode(latents)``: the VAE, with its latent scaling factor.

Prompts are checked, never silently altered: a prompt longer than the context raises (diffusers
truncates it with a warning), and a word the tokenizer maps to its unknown token raises naming the word
(diffusers pipelines, which call the tokenizer directly, see ``<unk>`` instead).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..schedules import schedule_from_config
from .denoiser import Denoiser
from .guidance import ClassifierFree, with_cond

__all__ = ["TextToImage", "load_text_to_image", "COMPONENTS"]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class TextToImage(Denoiser):
    """A latent ``Denoiser`` conditioned on prompts (see the module docstring)."""

    def __init__(
        self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, schedule: Any, prediction: str, *, name: str = ""
    ) -> None:
        c = unet.config
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(self._eps_or_v, schedule, prediction, data_shape=(c.in_channels, c.sample_size, c.sample_size))
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.name = name
        self.image_shape = (vae.config.in_channels, c.sample_size * f, c.sample_size * f)
        self.scaling_factor = float(vae.config.scaling_factor)
        self._cache: dict[str, Tensor] = {}

    def _net_dtype(self, x: Tensor) -> torch.dtype:
        # not ``unet.dtype``: diffusers walks every submodule on each read (0.7-4 ms per call on CPU,
        # docs/benchmarks/walltime.md)
        return next(self.unet.parameters()).dtype

    def _eps_or_v(
        self,
        x: Tensor,
        t: Tensor,
        *,
        prompt: str | Sequence[str] | None = None,
        encoder_hidden_states: Tensor | None = None,
    ) -> Tensor:
        if prompt is not None and encoder_hidden_states is not None:
            raise ValueError("give prompt= or encoder_hidden_states=, not both")
        if encoder_hidden_states is not None:
            states = encoder_hidden_states
        else:  # no conditioning is the unconditional model: the empty prompt (as guidance.Unconditional expects)
            states = self.encode_prompt("" if prompt is None else prompt, x.shape[0])
        if states.shape[0] != x.shape[0]:
            raise ValueError(f"encoder_hidden_states has {states.shape[0]} rows for a batch of {x.shape[0]}")
        return self.unet(x, t, encoder_hidden_states=states.to(x.device, self._net_dtype(x))).sample

    # --- prompts ------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> None:
        """``ValueError`` for a prompt longer than the context or with a word outside the vocabulary."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        tok = self.tokenizer
        enc = tok(prompt, return_offsets_mapping=bool(getattr(tok, "is_fast", False)))
        ids = enc.input_ids
        if len(ids) > tok.model_max_length:
            raise ValueError(
                f"prompt {prompt!r} has {len(ids)} tokens; the text encoder's context holds "
                f"{tok.model_max_length} (start and end tokens included)"
            )
        unk = tok.unk_token_id
        if unk is not None and unk in ids and unk not in (tok.pad_token_id, tok.eos_token_id):
            words = [prompt[a:b] for i, (a, b) in zip(ids, enc.get("offset_mapping", []), strict=False) if i == unk]
            vocab = [w for w in tok.get_vocab() if w not in tok.all_special_tokens]
            allowed = f"; allowed: {', '.join(sorted(vocab))}" if len(vocab) <= 100 else ""
            raise ValueError(
                f"word {(words or ['?'])[0]!r} of prompt {prompt!r} is not in the tokenizer's vocabulary{allowed}"
            )

    @torch.no_grad()
    def encode_prompt(self, prompt: str | Sequence[str], n: int | None = None) -> Tensor:
        """``(n, L, D)`` text-encoder states of ``prompt`` (one string for all ``n``, or ``n`` strings)."""
        prompts = [prompt] * (n or 1) if isinstance(prompt, str) else list(prompt)
        if n is not None and len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {n}")
        todo = sorted({p for p in prompts if p not in self._cache})
        for p in todo:
            self.check_prompt(p)
        if todo:
            tok = self.tokenizer
            ids = tok(
                todo, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            states = self.text_encoder(ids.to(self.text_encoder.device))[0].float()
            self._cache.update(zip(todo, states, strict=True))
        return torch.stack([self._cache[p] for p in prompts])

    def guided(self, scale: float, negative_prompt: str = "") -> Any:
        """Classifier-free guidance at ``scale`` (1 = none) against ``negative_prompt``; both branches in one UNet
        call of twice the batch, as diffusers' pipelines (two calls cost 1.3-1.5x on CPU,
        docs/benchmarks/walltime.md)."""
        return _BatchedCFG(self, with_cond(self, prompt=negative_prompt), scale, negative_prompt)

    # --- pixels <-> latents ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of ``images`` ``(N, *image_shape)`` in ``[-1, 1]`` (posterior mode, or a sample)."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}")
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` (clamped) of scaled ``latents``."""
        shape = tuple(self.data_shape or ())
        if tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents must be (N, {', '.join(map(str, shape))}), got {tuple(latents.shape)}")
        return self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def _component(folder: Path, name: str, loader: Any) -> Any:
    path = folder / name
    if not path.is_dir():
        raise ValueError(
            f"{folder}: component folder {name}/ is missing (a Stable Diffusion folder needs {', '.join(COMPONENTS)})"
        )
    try:
        return loader(str(path))
    except Exception as e:  # diffusers / transformers / safetensors raise many types for a bad folder
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: cannot load ({type(e).__name__}: {msg})") from None


def load_text_to_image(
    folder: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, name: str = ""
) -> TextToImage:
    """A diffusers-format Stable Diffusion folder as a ``TextToImage`` denoiser (offline, safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(folder)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{root}: not a diffusers folder (no model_index.json)")
    try:
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{root}/scheduler: cannot read scheduler_config.json ({e})") from None
    kw = {"torch_dtype": dtype, "use_safetensors": True}
    unet = _component(root, "unet", lambda p: UNet2DConditionModel.from_pretrained(p, **kw))
    vae = _component(root, "vae", lambda p: AutoencoderKL.from_pretrained(p, **kw))
    text = _component(
        root, "text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype, use_safetensors=True)
    )
    tok = _component(root, "tokenizer", AutoTokenizer.from_pretrained)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(sched.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"{root}/scheduler: prediction_type {sched.get('prediction_type')!r} is not supported")
    try:
        schedule = schedule_from_config(sched)
    except ValueError as e:
        raise ValueError(f"{root}/scheduler: {e}") from None
    return TextToImage(unet, vae, text, tok, schedule, pred, name=name or root.name)


class _BatchedCFG(ClassifierFree):
    """``ClassifierFree`` of a ``TextToImage`` and its negative prompt, evaluated in one call on ``[x; x]`` with
    ``[negative; prompts]`` (the same arithmetic as two calls, up to the UNet's batch rounding). Conditioning
    other than ``prompt`` goes through the two-call path."""

    def __init__(self, model: TextToImage, uncond: Any, scale: float, negative_prompt: str) -> None:
        super().__init__(model, uncond, scale)
        self.t2i, self.negative_prompt = model, negative_prompt

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self.scale == 1.0 or set(cond) - {"prompt"}:
            return super().__call__(x, t, **cond)
        n = x.shape[0]
        prompt = cond.get("prompt")
        prompts = [prompt or ""] * n if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {n}")
        tt = torch.cat([t, t]) if t.ndim > 0 else t
        x0_u, x0_c = self.t2i(torch.cat([x, x]), tt, prompt=[self.negative_prompt] * n + prompts).chunk(2)
        return x0_u + self.scale * (x0_c - x0_u)

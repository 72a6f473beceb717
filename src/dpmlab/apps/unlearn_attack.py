"""UnlearnDiffAtk — Zhang, Jia, Chen, Chen, Zhang, Ma, Wang, Liu, "To Generate or Not? Safety-Driven Unlearned
Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024, arXiv 2310.11868; authors' code
OPTML-Group/Diffusion-MU-Attack (``src/attackers/text_grad_.py``, ``src/tasks/classifier_.py``). The concept
eraser it attacks here is ESD — Gandikota, Materzynska, Fiotto-Kaufman, Bau, "Erasing Concepts from Diffusion
Models", ICCV 2023, arXiv 2303.07345; code rohitgandikota/erasing (``esd_diffusers.py``).

Both run on a ``TextToImage`` latent model (``dpmlab.load("mnist_t2i")`` or a Stable Diffusion folder).

**ESD** fine-tunes a copy θ' of the UNet so that, on the concept prompt c, it predicts the *negatively guided*
noise of the frozen model θ::

    x_t ~ partial DDIM sampling of θ' with prompt c (guidance 3), stopped at a random step i of the grid
    target = eps_θ(x_t, ∅, t) - eta [eps_θ(x_t, c, t) - eps_θ(x_t, ∅, t)]
    L = || eps_θ'(x_t, c, t) - target ||²

``TrainMethod.XATTN`` (ESD-x) trains only the cross-attention layers (``attn2``), ``TrainMethod.NOXATTN`` (ESD-u)
everything but cross-attention, the time embedding and the output convolution (ESD's ``noxattn``). The models
here predict v; every prediction is turned into eps at the same (x_t, t) through the ``Denoiser``'s x0 and
``schedule.eps_from_x0`` (for a VP schedule eps = sigma x_t + alpha v, so the eps-space loss is the v-space loss
weighted by alpha²; the target is the same linear combination in either space). The changed tensors only are
saved (safetensors, format ``dpmlab.esd/1``) with a JSON card; ``load_erased`` applies them to the base model.

**UnlearnDiffAtk** prepends k adversarial tokens to the prompt, each a point w_j on the probability simplex over
the allowed vocabulary (every non-special word, minus ``forbid``); its token embedding is ``w_j @ E`` (E: the text
encoder's input embedding rows of those words), spliced in as ``[SOT, adv_1..k, prompt, EOT, pad...]``. The loss
is the *unlearned* model's own denoising error on images x0 of the erased concept (the diffusion model as its own
classifier)::

    L(w) = || eps - eps_θ'(alpha_t x0 + sigma_t eps, t, text(w)) ||²,   t uniform, eps ~ N(0, I)

minimised by Adam (lr 1e-2, weight decay 0.1), each step followed by the exact Euclidean projection of every
w_j onto the simplex; the final prompt takes argmax tokens (real words). Then the unlearned model generates
with that prompt. ``Relaxation.CONTINUOUS`` feeds ``w_j @ E`` itself; ``Relaxation.STRAIGHT_THROUGH`` is the
authors' estimator (a token drawn from w_j forward, the hardtanh'd gradient backward).

Deviations from the authors' code: t is drawn uniformly per step and per image (they sweep 50 fixed timesteps
in order, 40 iterations each, and stop as soon as an external detector is satisfied — that detector is never
used here: the attack sees only the unlearned model and target images); a batch of target images per step
(they attack one image); the projection is the exact sort-based one (they bisect to 1e-5); ESD's partial
sampling uses ``ESDConfig.sample_steps`` DDIM steps (ESD: 50) and a batch of latents per step (ESD: one).
"""

from __future__ import annotations

import argparse
import copy
import enum
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import atomic_write, dataclass_from_dict
from ..api import make_grid, sample
from ..models.hub import write_safetensors
from ..models.t2i import TextToImage

__all__ = [
    "TrainMethod",
    "Relaxation",
    "ESDConfig",
    "AttackConfig",
    "AttackResult",
    "ESD_FORMAT",
    "project_simplex",
    "esd_target",
    "eps_prediction",
    "trainable_names",
    "erase",
    "save_erased",
    "load_erased",
    "allowed_words",
    "prompt_states",
    "attack",
    "target_latents",
    "generate",
    "concept_rate",
    "random_prefix",
    "main",
]

ESD_FORMAT = "dpmlab.esd/1"


class TrainMethod(enum.Enum):
    XATTN = "xattn"  # ESD-x: cross-attention (attn2) only
    NOXATTN = "noxattn"  # ESD-u: all but cross-attention, time embedding and output convolution


class Relaxation(enum.Enum):
    CONTINUOUS = "continuous"  # token embedding = w @ E
    STRAIGHT_THROUGH = "straight_through"  # authors' STERandSelect: sampled one-hot forward, hardtanh(grad) back


def _enum(cls: Any, v: Any, what: str) -> Any:
    try:
        return cls(v)
    except ValueError:
        raise ValueError(f"unknown {what} {v!r}; allowed: {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class ESDConfig:
    """ESD settings (paper defaults where they carry over; lr and steps sized for the 1.5 M-parameter UNet)."""

    concept: str = "seven"  # the prompt whose concept is erased
    method: TrainMethod = TrainMethod.XATTN
    eta: float = 1.0  # negative guidance (ESD's default 1)
    steps: int = 200  # optimiser steps (ESD: 1000 on SD)
    lr: float = 2e-3  # Adam (ESD: 1e-5 on SD's 860 M parameters)
    batch_size: int = 4  # latents per step (ESD: 1)
    sample_steps: int = 10  # DDIM grid of the partial sampling (ESD: 50)
    start_guidance: float = 3.0  # CFG scale of the partial sampling (ESD: 3)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _enum(TrainMethod, self.method, "ESD train method"))
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ValueError(f"concept must be a non-empty prompt, got {self.concept!r}")
        if self.steps < 1 or self.batch_size < 1 or self.sample_steps < 3:
            raise ValueError(
                f"need steps >= 1, batch_size >= 1, sample_steps >= 3; got {self.steps}, "
                f"{self.batch_size}, {self.sample_steps}"
            )
        if not (self.lr > 0 and self.eta >= 0 and self.start_guidance >= 0):
            raise ValueError(
                f"need lr > 0, eta >= 0, start_guidance >= 0; got {self.lr}, {self.eta}, {self.start_guidance}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "method": self.method.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ESDConfig:
        return dataclass_from_dict(cls, d, what="ESD config")


@dataclass(frozen=True)
class AttackConfig:
    """UnlearnDiffAtk settings (authors' k, lr and weight decay; steps and batch sized for CPU)."""

    k: int = 5  # adversarial prefix tokens
    steps: int = 200  # Adam steps (authors: 40 per timestep over a sweep of timesteps)
    lr: float = 1e-2
    weight_decay: float = 0.1
    batch_size: int = 8  # target images per step
    relaxation: Relaxation = Relaxation.CONTINUOUS
    forbid: tuple[str, ...] = ()  # words the prefix may not use (besides the special tokens)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "relaxation", _enum(Relaxation, self.relaxation, "relaxation"))
        object.__setattr__(self, "forbid", tuple(self.forbid))
        if self.k < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"need k >= 1, steps >= 0, batch_size >= 1; got {self.k}, {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"need lr > 0 and weight_decay >= 0; got {self.lr}, {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relaxation": self.relaxation.value, "forbid": list(self.forbid)}


@dataclass(frozen=True)
class AttackResult:
    words: tuple[str, ...]  # the k argmax prefix words
    prompt: str  # prefix + original prompt
    weights: Tensor  # (k, |allowed|) final simplex points
    allowed: tuple[str, ...]  # the words the columns of weights stand for
    losses: list[float] = field(default_factory=list)  # per step

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": list(self.words),
            "prompt": self.prompt,
            "allowed": list(self.allowed),
            "weights": self.weights.tolist(),
            "losses": self.losses,
        }


# --- shared math --------------------------------------------------------------------------------------------
def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of every row ``(..., n)`` onto the probability simplex {w >= 0, sum w = 1}
    (sort-based, exact: Held, Wolfe & Crowder 1974; Duchi et al. 2008)."""
    if v.ndim < 1 or v.shape[-1] < 1:
        raise ValueError(f"project_simplex needs rows of at least one entry, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError("project_simplex got non-finite entries")
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    ind = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / ind) > 0).sum(-1, keepdim=True)  # number of positive entries (>= 1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def esd_target(eps_uncond: Tensor, eps_concept: Tensor, eta: float) -> Tensor:
    """ESD's negatively guided target ``eps(∅) - eta (eps(c) - eps(∅))``."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


def eps_prediction(model: TextToImage, x: Tensor, t: Tensor, states: Tensor) -> Tensor:
    """The model's noise prediction at ``(x, t)`` (any parameterisation, via x̂0): ``(x - alpha x0) / sigma``."""
    return model.schedule.eps_from_x0(x, model(x, t, encoder_hidden_states=states), t)


def trainable_names(unet: torch.nn.Module, method: TrainMethod | str) -> list[str]:
    """Parameter names ESD trains under ``method`` (diffusers' UNet2DConditionModel names)."""
    m = _enum(TrainMethod, method, "ESD train method")
    names = [n for n, _ in unet.named_parameters()]
    if m is TrainMethod.XATTN:
        out = [n for n in names if ".attn2." in n]
    else:
        out = [n for n in names if ".attn2." not in n and not n.startswith(("time_embedding.", "conv_out."))]
    if not out:
        raise ValueError(f"the UNet has no parameters for ESD method {m.value!r} (no cross-attention 'attn2'?)")
    return out


def _with_unet(model: TextToImage, unet: torch.nn.Module, name: str) -> TextToImage:
    return TextToImage(
        unet, model.vae, model.text_encoder, model.tokenizer, model.schedule, model.prediction.value, name=name
    )


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


# --- ESD ----------------------------------------------------------------------------------------------------
def erase(
    model: TextToImage,
    config: ESDConfig = ESDConfig(),
    *,
    progress: bool = False,
    log: Callable[[int, float], None] | None = None,
) -> tuple[TextToImage, list[float]]:
    """ESD fine-tune of a copy of ``model.unet``; returns ``(erased model, loss per step)``. ``model`` is unchanged."""
    c = config
    model.check_prompt(c.concept)
    unet = copy.deepcopy(model.unet).requires_grad_(False)
    names = set(trainable_names(unet, c.method))
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if n in names]
    erased = _with_unet(model, unet, f"{model.name}-esd")
    opt = torch.optim.Adam(params, lr=c.lr)
    ts = make_grid(model.schedule, "uniform_time", c.sample_steps)  # DDIM grid of the partial sampling
    emb_c = model.encode_prompt(c.concept, c.batch_size)  # (B, L, D)
    emb_0 = model.encode_prompt("", c.batch_size)
    gen = torch.Generator().manual_seed(c.seed)
    losses: list[float] = []
    bar = _bar(c.steps, f"ESD erasing {c.concept!r}", progress)
    for step in range(c.steps):
        i = int(torch.randint(1, c.sample_steps - 1, (1,), generator=gen))  # stop after i DDIM steps
        with torch.no_grad():
            # x_t: the model being fine-tuned, prompted with the concept, sampled from noise down to ts[i]
            x = sample(
                erased.guided(c.start_guidance),
                c.batch_size,
                solver="ddim",
                nfe=None,
                grid=ts[: i + 1],
                cond={"prompt": c.concept},
                seed=c.seed * 1_000_003 + step,
            )
            t = ts[i].expand(c.batch_size)
            eps_c = eps_prediction(model, x, t, emb_c)  # frozen model, concept
            eps_0 = eps_prediction(model, x, t, emb_0)  # frozen model, empty prompt
            target = esd_target(eps_0, eps_c, c.eta)
        loss = F.mse_loss(eps_prediction(erased, x, t, emb_c), target)  # fine-tuned model, concept
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    unet.eval().requires_grad_(False)
    return erased, losses


def save_erased(
    path: str | Path, erased: TextToImage, base: TextToImage, config: ESDConfig, info: dict[str, Any] | None = None
) -> Path:
    """Write the tensors ESD changed (safetensors) and a JSON card ``<path>.json``; returns the safetensors path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the erased weights file must end in .safetensors, got {path.name!r}")
    names = trainable_names(erased.unet, config.method)
    state = erased.unet.state_dict()
    tensors = {n: state[n].detach().float().contiguous() for n in names}
    card = {
        "format": ESD_FORMAT,
        "base": base.name,
        "esd": config.to_dict(),
        "tensors": len(tensors),
        "parameters": int(sum(v.numel() for v in tensors.values())),
        **(info or {}),
    }
    write_safetensors(path, tensors, {"format": ESD_FORMAT, "card": json.dumps(card)})
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(card, indent=2))
    return path


def load_erased(path: str | Path, base: TextToImage | None = None) -> TextToImage:
    """The base model (default ``dpmlab.load(card['base'])``) with the ESD tensors in ``path`` applied to a
    copy of its UNet."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"erased weights not found: {path}")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if meta.get("format") != ESD_FORMAT:
        raise ValueError(f"{path}: not an ESD weights file (format {meta.get('format')!r}, need {ESD_FORMAT!r})")
    card = json.loads(meta.get("card", "{}"))
    if base is None:
        from ..models.hub import load

        loaded: Any = load(card.get("base", "mnist_t2i"))
        base = loaded
    if not isinstance(base, TextToImage):
        raise ValueError(f"ESD weights apply to a text-to-image model, got {type(base).__name__}")
    unet = copy.deepcopy(base.unet)
    own = dict(unet.named_parameters())
    for k, v in tensors.items():
        if k not in own or tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: tensor {k!r} {tuple(v.shape)} does not fit the base UNet")
        own[k].data.copy_(v.to(own[k].dtype))
    return _with_unet(base, unet.eval().requires_grad_(False), f"{base.name}-esd")


# --- UnlearnDiffAtk -------------------------------------------------------------------------------------------
def allowed_words(model: TextToImage, forbid: Sequence[str] = ()) -> tuple[tuple[str, ...], Tensor]:
    """The words an adversarial token may become (vocabulary minus special tokens minus ``forbid``) and their ids."""
    tok = model.tokenizer
    vocab = tok.get_vocab()
    unknown = sorted(set(forbid) - set(vocab))
    if unknown:
        raise ValueError(f"forbidden word(s) {', '.join(unknown)} are not in the vocabulary")
    special = set(tok.all_special_tokens)
    words = tuple(sorted((w for w in vocab if w not in special and w not in set(forbid)), key=vocab.__getitem__))
    if not words:
        raise ValueError("no vocabulary word is left for the adversarial tokens")
    return words, torch.tensor([vocab[w] for w in words])


@contextmanager
def _spliced_embeddings(text_encoder: Any, position: int, embeds: Tensor) -> Iterator[None]:
    """Replace the token embeddings at ``position : position + len(embeds)`` of every sequence the text encoder
    embeds (a forward hook on its input embedding; the rest of its forward — positions, causal mask, layers,
    final norm — is the model's own)."""
    k = embeds.shape[-2]

    def hook(module: Any, inputs: Any, out: Tensor) -> Tensor:
        e = embeds.to(out.dtype).expand(out.shape[0], k, out.shape[-1])
        return torch.cat([out[:, :position], e, out[:, position + k :]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _prompt_ids(model: TextToImage, k: int, prompt: str) -> Tensor:
    """``(1, L)`` ids ``[SOT, <k placeholders>, prompt, EOT, pad...]``; raises if they exceed the context."""
    if prompt:
        model.check_prompt(prompt)
    tok = model.tokenizer
    body = tok(prompt, add_special_tokens=False).input_ids if prompt else []
    length = tok.model_max_length
    if 2 + k + len(body) > length:
        raise ValueError(
            f"k = {k} adversarial tokens + {len(body)} prompt tokens + start/end exceed the text "
            f"encoder's context of {length}; use k <= {length - 2 - len(body)}"
        )
    ids = [tok.bos_token_id, *([tok.unk_token_id] * k), *body, tok.eos_token_id]
    return torch.tensor([ids + [tok.pad_token_id] * (length - len(ids))])


def prompt_states(model: TextToImage, weights: Tensor, allowed_ids: Tensor, prompt: str) -> Tensor:
    """``(1, L, D)`` text-encoder states of ``[SOT, w_1 @ E, ..., w_k @ E, prompt, EOT...]`` with ``weights``
    ``(k, |allowed|)`` on the simplex over ``allowed_ids`` (differentiable in ``weights``; a one-hot row is that
    word's own embedding, so the states then equal ``model.encode_prompt`` of the written prompt)."""
    te = model.text_encoder
    ids = _prompt_ids(model, weights.shape[0], prompt).to(te.device)
    table = te.get_input_embeddings().weight[allowed_ids.to(te.device)]  # (|allowed|, D)
    with _spliced_embeddings(te, 1, (weights.to(table.dtype) @ table)[None]):
        return te(ids)[0].float()


class _STERandSelect(torch.autograd.Function):
    """Forward: a one-hot token drawn from each row of w; backward: hardtanh of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, gen: torch.Generator) -> Tensor:  # type: ignore[override]
        idx = torch.multinomial(w.detach().clamp_min(0), 1, generator=gen).squeeze(-1)
        return F.one_hot(idx, w.shape[-1]).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return F.hardtanh(grad), None


def attack(
    model: TextToImage, prompt: str, targets: Tensor, config: AttackConfig = AttackConfig(), *, progress: bool = False
) -> AttackResult:
    """UnlearnDiffAtk: k prefix tokens for ``prompt`` minimising ``model``'s denoising loss on the target latents
    ``targets`` ``(N, *model.data_shape)`` (images of the erased concept, ``model.encode``-d)."""
    c = config
    if tuple(targets.shape[1:]) != tuple(model.data_shape or ()) or targets.shape[0] < 1:
        raise ValueError(
            f"targets must be latents (N, {', '.join(map(str, model.data_shape or ()))}), got {tuple(targets.shape)}"
        )
    words, ids = allowed_words(model, c.forbid)
    _prompt_ids(model, c.k, prompt)  # context check before any work
    gen = torch.Generator().manual_seed(c.seed)
    w = project_simplex(torch.full((c.k, len(words)), 1.0 / len(words))).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=c.lr, weight_decay=c.weight_decay)
    sch = model.schedule
    losses: list[float] = []
    bar = _bar(c.steps, "UnlearnDiffAtk", progress)
    for _ in range(c.steps):
        x0 = targets[torch.randint(0, targets.shape[0], (c.batch_size,), generator=gen)]
        t = sch.t_min + (sch.t_max - sch.t_min) * torch.rand(c.batch_size, generator=gen, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = sch.add_noise(x0, eps, t)  # alpha_t x0 + sigma_t eps
        w_used = _STERandSelect.apply(w, gen) if c.relaxation is Relaxation.STRAIGHT_THROUGH else w
        states = prompt_states(model, w_used, ids, prompt).expand(c.batch_size, -1, -1)
        loss = F.mse_loss(eps_prediction(model, x_t, t, states), eps)  # the unlearned model as its own classifier
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w.copy_(project_simplex(w))  # back onto the simplex
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    best = tuple(words[j] for j in w.detach().argmax(-1).tolist())
    full = " ".join([*best, prompt]) if prompt else " ".join(best)
    return AttackResult(best, full, w.detach().clone(), words, losses)


def random_prefix(model: TextToImage, k: int, prompt: str, *, forbid: Sequence[str] = (), seed: int = 0) -> str:
    """The control: ``k`` uniformly drawn allowed words before ``prompt``."""
    words, _ = allowed_words(model, forbid)
    _prompt_ids(model, k, prompt)
    g = torch.Generator().manual_seed(seed)
    pick = [words[j] for j in torch.randint(0, len(words), (k,), generator=g).tolist()]
    return " ".join([*pick, prompt]) if prompt else " ".join(pick)


# --- data, generation, evaluation -----------------------------------------------------------------------------
def target_latents(model: TextToImage, digit: int, n: int = 200) -> Tensor:
    """Latents of up to ``n`` MNIST-5k *training-split* images of ``digit`` (padded 28 -> 32, ``model.encode``)."""
    from ..metrics.features import mnist_5k, mnist_5k_split

    if not 0 <= digit <= 9 or n < 1:
        raise ValueError(f"need a digit in 0..9 and n >= 1; got digit {digit!r}, n {n!r}")
    d = mnist_5k()
    train, _ = mnist_5k_split(d.labels)
    idx = train[d.labels[train] == digit][:n]
    images = F.pad(d.images[idx], (2, 2, 2, 2), value=-1.0)
    return torch.cat([model.encode(b) for b in images.split(256)])


def generate(
    model: TextToImage,
    prompt: str,
    n: int,
    *,
    guidance: float = 3.0,
    nfe: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """``n`` images ``(n, 1, 32, 32)`` in [-1, 1]: DPM-Solver++ at ``nfe`` with classifier-free guidance."""
    model.check_prompt(prompt)
    fn = model.guided(guidance) if guidance != 1.0 else model
    z = sample(fn, n, solver="dpm_solver_pp", nfe=nfe, seed=seed, cond={"prompt": prompt})
    return torch.cat([model.decode(b) for b in z.split(256)])


def concept_rate(images: Tensor, digit: int) -> float:
    """Share of ``images`` (N, 1, 32, 32) the independent evaluator (MNIST classifier B) labels ``digit``."""
    from ..metrics.features import evaluator_predictions

    return float((evaluator_predictions(images[:, :, 2:30, 2:30]) == digit).float().mean())


# --- command line ---------------------------------------------------------------------------------------------
def _save_png(images: Tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    n = images.shape[0]
    cols = min(n, 16)
    rows = -(-n // cols)
    h, wd = images.shape[-2:]
    grid = np.zeros((rows * h, cols * wd), dtype=np.uint8)
    arr = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    for i in range(n):
        r, cc = divmod(i, cols)
        grid[r * h : (r + 1) * h, cc * wd : (cc + 1) * wd] = arr[i]
    with atomic_write(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _out(path: str, suffix: str, overwrite: bool) -> Path:
    p = Path(path)
    if p.suffix != suffix:
        raise ValueError(f"--out must end in {suffix}, got {p.name!r}")
    if p.exists() and not overwrite:
        raise ValueError(f"{p} exists; pass --overwrite to replace it")
    return p


def _model(erased: str | None) -> TextToImage:
    from ..models.hub import load

    base = load("mnist_t2i")
    if not isinstance(base, TextToImage):
        raise ValueError("mnist_t2i did not load as a text-to-image model")
    return load_erased(erased, base) if erased else base


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpmlab.apps.unlearn_attack",
        description="ESD concept erasure and the UnlearnDiffAtk prompt attack on mnist_t2i",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("erase", help="ESD: erase a concept (writes the changed weights + a JSON card)")
    e.add_argument("--concept", default="seven")
    e.add_argument("--method", default="xattn", choices=[m.value for m in TrainMethod])
    e.add_argument("--steps", type=int, default=200)
    e.add_argument("--lr", type=float, default=2e-3)
    e.add_argument("--eta", type=float, default=1.0)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of ESD's partial sampling")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="weights (.safetensors); the card goes beside it (.json)")
    a = sub.add_parser("attack", help="UnlearnDiffAtk: find k prefix words that bring the concept back")
    a.add_argument("--erased", help="ESD weights (.safetensors); default: attack the base model")
    a.add_argument("--prompt", default="a seven")
    a.add_argument("--digit", type=int, default=7, help="the concept's digit (target images: MNIST of it)")
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--relaxation", default="continuous", choices=[r.value for r in Relaxation])
    a.add_argument("--forbid", default="", help="comma-separated words the prefix may not use")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="result (.json)")
    g = sub.add_parser("generate", help="images of a prompt (and the evaluator's rate of --digit)")
    g.add_argument("--erased", help="ESD weights (.safetensors); default: the base model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--digit", type=int, help="report the share classifier B labels this digit")
    g.add_argument("--n", type=int, default=64)
    g.add_argument("--guidance", type=float, default=3.0)
    g.add_argument("--nfe", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="picture (.png)")
    for s in (e, a, g):
        s.add_argument("--overwrite", action="store_true")
        s.add_argument("--quiet", action="store_true")
    return p


def _check_erased(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise ValueError(f"--erased {path}: no such file")


def _cmd_erase(a: argparse.Namespace) -> int:
    out = _out(a.out, ".safetensors", a.overwrite)
    if out.with_suffix(".json").exists() and not a.overwrite:
        raise ValueError(f"{out.with_suffix('.json')} exists; pass --overwrite to replace it")
    cfg = ESDConfig(
        concept=a.concept,
        method=a.method,
        steps=a.steps,
        lr=a.lr,
        eta=a.eta,
        batch_size=a.batch_size,
        sample_steps=a.sample_steps,
        seed=a.seed,
    )
    base = _model(None)
    base.check_prompt(cfg.concept)
    erased, losses = erase(base, cfg, progress=not a.quiet)
    n = max(1, len(losses) // 10)
    save_erased(out, erased, base, cfg, {"loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n})
    print(
        f"wrote {out} and {out.with_suffix('.json')}: ESD loss {sum(losses[:n]) / n:.4f} -> "
        f"{sum(losses[-n:]) / n:.4f} over {len(losses)} steps"
    )
    return 0


def _cmd_attack(a: argparse.Namespace) -> int:
    out = _out(a.out, ".json", a.overwrite)
    _check_erased(a.erased)
    forbid = tuple(w.strip() for w in a.forbid.split(",") if w.strip())
    cfg = AttackConfig(k=a.k, steps=a.steps, relaxation=a.relaxation, forbid=forbid, seed=a.seed)
    if not 0 <= a.digit <= 9:
        raise ValueError(f"--digit must be in 0..9, got {a.digit}")
    model = _model(a.erased)
    _prompt_ids(model, cfg.k, a.prompt)
    allowed_words(model, forbid)
    res = attack(model, a.prompt, target_latents(model, a.digit), cfg, progress=not a.quiet)
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps({"erased": a.erased, "config": cfg.to_dict(), **res.to_dict()}))
    print(
        f"adversarial prompt: {res.prompt!r} (loss {res.losses[0] if res.losses else float('nan'):.4f} -> "
        f"{res.losses[-1] if res.losses else float('nan'):.4f}); wrote {out}"
    )
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    out = _out(a.out, ".png", a.overwrite)
    _check_erased(a.erased)
    if a.n < 1 or a.nfe < 1:
        raise ValueError(f"--n and --nfe must be >= 1, got {a.n}, {a.nfe}")
    if a.digit is not None and not 0 <= a.digit <= 9:
        raise ValueError(f"--digit must be in 0..9, got {a.digit}")
    model = _model(a.erased)
    images = generate(model, a.prompt, a.n, guidance=a.guidance, nfe=a.nfe, seed=a.seed)
    _save_png(images, out)
    rate = f"; classifier B labels {concept_rate(images, a.digit):.3f} of them {a.digit}" if a.digit is not None else ""
    print(f"wrote {out} ({a.n} images of {a.prompt!r}){rate}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)
    run = {"erase": _cmd_erase, "attack": _cmd_attack, "generate": _cmd_generate}[a.cmd]
    try:
        return run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

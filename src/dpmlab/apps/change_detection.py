"""DDPM-CD — Bandara, Nair & Patel, "DDPM-CD: Denoising Diffusion Probabilistic Models as Feature Extractors for
Change Detection", WACV 2025, arXiv 2206.11892; authors' code wgcban/ddpm-cd (``model/sr3_modules/unet.py``,
``model/cd_modules/cd_head_v2.py``).

1. Pre-train an unconditional DDPM on *unlabelled* single images (here: ``recipes/apps/ddpm_cd_scenes.json`` on
   the scenes of ``make_scenes``, with dpmlab's trainer).
2. Freeze it. Noise an image to each timestep ``n`` in ``timesteps`` (authors: 50, 100, 400), ``x_n = sqrt(abar_n)
   x + sqrt(1 - abar_n) eps``, run the UNet once on the stacked batch and capture one *decoder* activation per
   resolution (``DiffusionFeatures``; the authors' ``feat_scales = [2, 5, 8, 11, 14]`` of the reversed decoder
   list are the first res-block of each decoder level, which is what is captured here: dpmlab ``up.{l}.res0``
   (``up.{l}.attn0`` where attention follows it), diffusers ``up_blocks[l].attentions[0]`` or ``.resnets[0]``).
   Per scale the features of all timesteps are concatenated on the channels: ``(B, n_t C_s, H_s, W_s)``.
3. Change head (``ChangeHead``, after ``cd_head_v2``), coarse to fine over scales ``s``::

       g_s = ReLU(Conv3x3(ReLU(Conv1x1(f))))           1x1 (n_t C_s -> C_s) only when n_t > 1
       d_s = |g_s(f_A) - g_s(f_B)| + up(x_{s-1})       the difference is symmetric in A and B
       x_s = ReLU(Conv3x3(d_s))                         channels to the next scale's; up: bilinear to its size
       logits = Conv3x3(ReLU(Conv3x3(d_last)))          2 classes (no change / change)

   trained with cross-entropy and Adam on labelled pairs (``train_head``); ``change_metrics`` gives F1, IoU,
   precision and recall of the change class and overall accuracy from the pixel confusion counts of a set.

Data (``make_pairs``, ``make_scenes``): up to ``max_digits`` MNIST digits (``dpmlab.metrics.mnist_5k``; training
split for ``split="train"``, the held-out ``mnist_5k_split`` digits for ``"test"``) in distinct cells of a 2x2 grid
on a smooth random texture; the second image adds, removes or moves digits; both get their own brightness /
contrast jitter and pixel noise. The change mask is exact: the ink (alpha > 1/2) of every digit placement in the
symmetric difference of the two scenes' placements (a moved digit: old ink OR new ink).

Deviations from the authors' code: the same noise ``eps`` is used for A and B of a pair (common random numbers;
the authors draw each image's noise independently); no channel-spatial squeeze-excitation after the fusion conv;
the classifier reads the finest fused difference ``d_last`` (``cd_head_v2`` classifies the upsampled previous
level and leaves the finest difference unused); a tiny dpmlab UNet on a linear 1000-step schedule, not SR3 on
T = 2000.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SceneConfig",
    "Placement",
    "ChangePairs",
    "digit_pool",
    "render",
    "ink",
    "change_mask",
    "make_scenes",
    "make_pairs",
    "check_pairs",
    "DiffusionFeatures",
    "PixelFeatures",
    "extract",
    "ChangeHead",
    "train_head",
    "predict",
    "ChangeMetrics",
    "change_metrics",
    "write_scenes",
    "save_pairs",
    "load_pairs",
    "save_head",
    "load_head",
    "build_extractor",
    "main",
]


# --- data -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConfig:
    """Synthetic change-detection scenes (defaults: 32x32, digits 12x12, 2x2 grid of 16x16 cells)."""

    size: int = 32  # image side; the grid has 2x2 cells of size // 2
    digit_size: int = 12  # side of a digit (MNIST 28x28 area-resized); must fit in a cell
    max_digits: int = 3  # digits per scene: 1..max_digits (at most 4, one per cell)
    texture_cells: int = 4  # smooth texture: a random grid of this side, bicubic-upsampled
    texture_range: tuple[float, float] = (-0.9, 0.2)  # texture values (ink is +1)
    brightness: float = 0.15  # per image: + U(-brightness, brightness)
    contrast: float = 0.2  # per image: x U(1 - contrast, 1 + contrast)
    noise: float = 0.05  # per image: + N(0, noise^2) per pixel
    p_unchanged: float = 0.1  # probability that a pair has no change (only the nuisances)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texture_range", tuple(float(v) for v in self.texture_range))
        if self.size < 4 or self.size % 2:
            raise ValueError(f"SceneConfig.size must be an even int >= 4, got {self.size!r}")
        if not 1 <= self.digit_size <= self.size // 2:
            raise ValueError(
                f"SceneConfig.digit_size must be in [1, {self.size // 2}] (a grid cell), got {self.digit_size!r}"
            )
        if not 1 <= self.max_digits <= 4:
            raise ValueError(f"SceneConfig.max_digits must be in [1, 4], got {self.max_digits!r}")
        if self.texture_cells < 1:
            raise ValueError(f"SceneConfig.texture_cells must be >= 1, got {self.texture_cells!r}")
        lo, hi = self.texture_range
        if not -1.0 <= lo <= hi <= 1.0:
            raise ValueError(f"SceneConfig.texture_range must be lo <= hi within [-1, 1], got {self.texture_range}")
        for name in ("brightness", "contrast", "noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SceneConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.p_unchanged <= 1.0:
            raise ValueError(f"SceneConfig.p_unchanged must be in [0, 1], got {self.p_unchanged!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["texture_range"] = list(self.texture_range)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SceneConfig:
        from .._utils import dataclass_from_dict

        return dataclass_from_dict(cls, d, what="SceneConfig", tuple_fields=("texture_range",))


class Placement(NamedTuple):
    """One digit in a scene: ``digit`` indexes the split's ``digit_pool``; ``cell`` 0..3 (row-major 2x2 grid);
    ``dy, dx`` the offset of the digit inside its cell."""

    digit: int
    cell: int
    dy: int
    dx: int


@dataclass(frozen=True)
class ChangePairs:
    """``a``, ``b`` ``(N, 1, S, S)`` in [-1, 1] (before / after) and ``mask`` ``(N, S, S)`` bool (True: changed)."""

    a: Tensor
    b: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        check_pairs(self.a, self.b, self.mask)

    def __len__(self) -> int:
        return int(self.a.shape[0])


def check_pairs(a: Tensor, b: Tensor, mask: Tensor | None = None) -> None:
    """Raise a one-line ``ValueError`` unless ``a``, ``b`` are ``(N, C, H, W)`` of equal shape with ``N >= 1`` and
    ``mask`` (if given) is ``(N, H, W)`` with values 0/1."""
    if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"mismatched pair: a has shape {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError("the set of pairs is empty (N = 0)")
    if mask is None:
        return
    want = (a.shape[0], a.shape[2], a.shape[3])
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape {want} (N, H, W), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask values must be 0 or 1 (1 = changed)")


@functools.lru_cache(maxsize=4)
def digit_pool(split: str, digit_size: int = 12) -> Tensor:
    """Digit alphas ``(N, digit_size, digit_size)`` in [0, 1]: MNIST 5k training digits (``"train"``, 4,500) or the
    held-out ones (``"test"``, 500) of ``dpmlab.metrics.mnist_5k_split``, area-resized."""
    from ..metrics.features import mnist_5k, mnist_5k_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = mnist_5k()
    train_idx, test_idx = mnist_5k_split(d.labels)
    x = (d.images[train_idx if split == "train" else test_idx] + 1.0) / 2.0  # (N, 1, 28, 28) in [0, 1]
    return F.interpolate(x, size=(digit_size, digit_size), mode="area")[:, 0].clamp(0.0, 1.0)


def _alpha(placements: Sequence[Placement], digits: Tensor, size: int) -> Tensor:
    """Ink alpha ``(size, size)`` of the placed digits (the maximum where placements overlap, which a scene's
    never do; the symmetric difference of two scenes' may)."""
    out = torch.zeros(size, size)
    k, cell = digits.shape[-1], size // 2
    for p in placements:
        y, x = (p.cell // 2) * cell + p.dy, (p.cell % 2) * cell + p.dx
        out[y : y + k, x : x + k] = torch.maximum(out[y : y + k, x : x + k], digits[p.digit])
    return out


def ink(placements: Sequence[Placement], digits: Tensor, size: int = 32) -> Tensor:
    """Binary ink ``(size, size)`` (alpha > 1/2) of the placed digits."""
    return _alpha(placements, digits, size) > 0.5


def change_mask(before: Sequence[Placement], after: Sequence[Placement], digits: Tensor, size: int = 32) -> Tensor:
    """The exact change mask ``(size, size)``: the ink of every placement in one scene and not in the other
    (added, removed, both positions of a moved digit)."""
    return ink(sorted(set(before) ^ set(after)), digits, size)


def render(texture: Tensor, placements: Sequence[Placement], digits: Tensor) -> Tensor:
    """A clean scene ``(1, S, S)``: the texture with white ink (+1) composited by its alpha."""
    a = _alpha(placements, digits, texture.shape[-1])
    return (texture * (1 - a) + a)[None]


def _texture(cfg: SceneConfig, g: torch.Generator) -> Tensor:
    lo, hi = cfg.texture_range
    u = torch.rand(1, 1, cfg.texture_cells, cfg.texture_cells, generator=g)
    t = F.interpolate(u, size=(cfg.size, cfg.size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)
    return lo + (hi - lo) * t


def _nuisance(x: Tensor, cfg: SceneConfig, g: torch.Generator) -> Tensor:
    """Brightness / contrast jitter and pixel noise of one image, clipped to [-1, 1]."""
    c = 1.0 + cfg.contrast * (2 * float(torch.rand((), generator=g)) - 1)
    b = cfg.brightness * (2 * float(torch.rand((), generator=g)) - 1)
    return (c * x + b + cfg.noise * torch.randn(x.shape, generator=g)).clamp(-1.0, 1.0)


def _offset(cfg: SceneConfig, g: torch.Generator) -> tuple[int, int]:
    free = cfg.size // 2 - cfg.digit_size
    dy, dx = torch.randint(0, free + 1, (2,), generator=g).tolist()
    return int(dy), int(dx)


def _scene(cfg: SceneConfig, n_pool: int, g: torch.Generator) -> list[Placement]:
    """1..max_digits digits in distinct random cells."""
    k = 1 + int(torch.randint(0, cfg.max_digits, (), generator=g))
    out = []
    for c in torch.randperm(4, generator=g)[:k].tolist():
        out.append(Placement(int(torch.randint(0, n_pool, (), generator=g)), int(c), *_offset(cfg, g)))
    return out


def _change(before: list[Placement], cfg: SceneConfig, n_pool: int, g: torch.Generator) -> list[Placement]:
    """One or two edits: add a digit in an empty cell, remove one, or move one (to an empty cell or elsewhere
    in its own cell)."""
    after = list(before)
    for _ in range(1 + int(torch.randint(0, 2, (), generator=g))):
        empty = [c for c in range(4) if c not in {p.cell for p in after}]
        ops = (["add"] if empty and len(after) < cfg.max_digits else []) + (["remove", "move"] if after else [])
        op = ops[int(torch.randint(0, len(ops), (), generator=g))]
        if op == "add":
            cell = empty[int(torch.randint(0, len(empty), (), generator=g))]
            after.append(Placement(int(torch.randint(0, n_pool, (), generator=g)), cell, *_offset(cfg, g)))
            continue
        i = int(torch.randint(0, len(after), (), generator=g))
        p = after.pop(i)
        if op == "move":
            cells = [*empty, p.cell]
            for _try in range(8):  # a move must change the placement
                q = p._replace(
                    cell=cells[int(torch.randint(0, len(cells), (), generator=g))],
                    **dict(zip(("dy", "dx"), _offset(cfg, g))),
                )
                if q != p:
                    after.insert(i, q)
                    break
    return after


def make_scenes(n: int, *, split: str = "train", seed: int = 0, config: SceneConfig | None = None) -> Tensor:
    """``n`` single unlabelled scenes ``(n, 1, S, S)`` (texture, digits, nuisance) for diffusion pre-training."""
    cfg = config or SceneConfig()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    digits, g = digit_pool(split, cfg.digit_size), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tex = _texture(cfg, g)
        out.append(_nuisance(render(tex, _scene(cfg, len(digits), g), digits), cfg, g))
    return torch.stack(out)


def make_pairs(n: int, *, split: str = "train", seed: int = 0, config: SceneConfig | None = None) -> ChangePairs:
    """``n`` labelled pairs: scene A, scene B = A with digits added / removed / moved (none with probability
    ``p_unchanged``), the same texture, independent nuisance per image, and the exact change mask."""
    cfg = config or SceneConfig()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    digits, g = digit_pool(split, cfg.digit_size), torch.Generator().manual_seed(seed)
    a, b, m = [], [], []
    for _ in range(n):
        tex = _texture(cfg, g)
        before = _scene(cfg, len(digits), g)
        same = float(torch.rand((), generator=g)) < cfg.p_unchanged
        after = list(before) if same else _change(before, cfg, len(digits), g)
        a.append(_nuisance(render(tex, before, digits), cfg, g))
        b.append(_nuisance(render(tex, after, digits), cfg, g))
        m.append(change_mask(before, after, digits, cfg.size))
    return ChangePairs(torch.stack(a), torch.stack(b), torch.stack(m))


def write_scenes(folder: str | Path, scenes: Tensor) -> None:
    """Write scenes ``(N, 1, S, S)`` in [-1, 1] as 8-bit PNGs ``00000.png ...`` (a ``folder`` data set of the
    trainer)."""
    import numpy as np
    from PIL import Image

    from .._utils import atomic_write

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    arr = ((scenes[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i, im in enumerate(arr):
        with atomic_write(root / f"{i:05d}.png") as tmp:
            Image.fromarray(np.ascontiguousarray(im), mode="L").save(tmp, format="PNG")


# --- features -------------------------------------------------------------------------------------------------
DEFAULT_TIMESTEPS = (50, 100, 400)


def _linear_alphas_cumprod() -> Tensor:
    from ..schedules import DiscreteVP

    return DiscreteVP.from_preset("linear").alphas_cumprod


class DiffusionFeatures:
    """Multi-timestep decoder features of a frozen diffusion UNet (dpmlab ``UNet`` or diffusers ``UNet2DModel``).

    ``features(x)`` with ``x`` ``(B, C, H, W)`` in [-1, 1] returns one tensor per decoder level, coarse to fine,
    ``(B, n_t C_s, H_s, W_s)``: the timesteps' activations concatenated on the channels. ``timesteps`` are training
    indices ``n`` of the discrete schedule ``alphas_cumprod`` (default: the linear 1000-step one), where the net
    is called with time ``n``. The noise is drawn from a generator seeded with ``seed`` at every call, so equal
    batch sizes give A and B of a pair the same noise.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        alphas_cumprod: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        from ..models.unet import UNet

        abar = (alphas_cumprod if alphas_cumprod is not None else _linear_alphas_cumprod()).double()
        ts = tuple(int(t) for t in timesteps)
        if not ts or len(set(ts)) != len(ts) or any(not 0 <= t < abar.numel() for t in ts):
            raise ValueError(f"timesteps must be distinct indices in [0, {abar.numel()}), got {tuple(timesteps)}")
        self.net, self.timesteps, self.abar, self.seed = net.eval().requires_grad_(False), ts, abar, seed
        self._names: list[str] = []
        self._modules: list[nn.Module] = []
        if isinstance(net, UNet):
            cfg = net.config
            for lvl in reversed(range(len(cfg.channel_mult))):  # coarse to fine; the first block of each level
                self._names.append(f"up.{lvl}.attn0" if f"up.{lvl}.attn0" in net.up_names else f"up.{lvl}.res0")
            self.in_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        elif hasattr(net, "up_blocks") and hasattr(net, "config"):
            dcfg: Any = net.config  # a diffusers FrozenDict
            if getattr(dcfg, "cross_attention_dim", None) is not None:
                raise ValueError("a diffusers UNet2DConditionModel needs text conditioning; pass a UNet2DModel")
            blocks: Any = net.up_blocks
            for blk in blocks:
                att = getattr(blk, "attentions", None)
                self._modules.append(att[0] if att else blk.resnets[0])
            s = dcfg.sample_size
            self.in_shape = (int(dcfg.in_channels), *((s, s) if isinstance(s, int) else tuple(s)))
        else:
            raise ValueError(f"unsupported network {type(net).__name__}; allowed: dpmlab UNet, diffusers UNet2DModel")
        with torch.no_grad():
            self.channels = [int(f.shape[1]) for f in self(torch.zeros(1, *self.in_shape))]

    def _forward(self, x_t: Tensor, t: Tensor) -> list[Tensor]:
        net = self.net
        if self._names:
            with net.hooks(capture=self._names) as feats:  # type: ignore[operator]
                net(x_t, t)
            return [feats[n][0] for n in self._names]
        out: list[Tensor] = []

        def keep(_m: nn.Module, _inp: Any, o: Any) -> None:
            o = o[0] if isinstance(o, tuple) else getattr(o, "sample", o)
            out.append(o.detach())

        handles = [m.register_forward_hook(keep) for m in self._modules]
        try:
            net(x_t, t)
        finally:
            for h in handles:
                h.remove()
        return out

    @torch.no_grad()
    def __call__(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        b, n_t = x.shape[0], len(self.timesteps)
        g = torch.Generator().manual_seed(self.seed)
        eps = torch.randn((n_t, *x.shape), generator=g).to(x)  # (n_t, B, C, H, W)
        a = self.abar[list(self.timesteps)].to(x)  # (n_t,)
        x_t = a.sqrt().view(-1, 1, 1, 1, 1) * x[None] + (1 - a).sqrt().view(-1, 1, 1, 1, 1) * eps  # q(x_n | x)
        t = torch.tensor(self.timesteps, device=x.device).repeat_interleave(b)  # (n_t B,)
        feats = self._forward(x_t.reshape(n_t * b, *x.shape[1:]), t)  # each (n_t B, C_s, H_s, W_s)
        return [torch.cat(f.float().reshape(n_t, b, *f.shape[1:]).unbind(0), dim=1) for f in feats]


class PixelFeatures:
    """The raw-pixel baseline: one "scale", the image itself."""

    timesteps: tuple[int, ...] = ()

    def __init__(self, channels: int = 1) -> None:
        self.channels = [channels]

    def __call__(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != self.channels[0]:
            raise ValueError(f"images must have shape (B, {self.channels[0]}, H, W), got {tuple(x.shape)}")
        return [x.float()]


Extractor = Callable[[Tensor], list[Tensor]]


def extract(extractor: Extractor, images: Tensor, *, batch_size: int = 64, progress: bool = False) -> list[Tensor]:
    """Features of ``images`` ``(N, C, H, W)`` in batches of ``batch_size`` (batch ``k`` always holds images
    ``k B .. (k + 1) B - 1``, so A and B images of a pair get the same noise)."""
    from tqdm import tqdm

    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = [
        extractor(images[i : i + batch_size])
        for i in tqdm(range(0, images.shape[0], batch_size), desc="features", disable=not progress, leave=False)
    ]
    return [torch.cat(level) for level in zip(*parts)]


# --- the change head ------------------------------------------------------------------------------------------
class ChangeHead(nn.Module):
    """``cd_head_v2``-style head: ``logits = head(feats_a, feats_b)`` ``(B, 2, H, W)`` from per-scale features
    (coarse to fine, ``channels[s]`` = ``n_t C_s``), symmetric in A and B. ``out_size`` (default: the finest
    scale's) upsamples the logits bilinearly."""

    def __init__(self, channels: Sequence[int], *, n_t: int = 1, hidden: int = 32, classes: int = 2) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or n_t < 1 or any(c < 1 or c % n_t for c in channels):
            raise ValueError(f"channels must be positive multiples of n_t={n_t}, got {channels}")
        self.channels, self.n_t = channels, n_t
        dims = [c // n_t for c in channels]
        self.g = nn.ModuleList(
            nn.Sequential(
                *([nn.Conv2d(c, d, 1), nn.ReLU()] if n_t > 1 else []), nn.Conv2d(d, d, 3, padding=1), nn.ReLU()
            )
            for c, d in zip(channels, dims)
        )
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, d_next, 3, padding=1), nn.ReLU()) for d, d_next in zip(dims[:-1], dims[1:])
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(dims[-1], hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, classes, 3, padding=1)
        )

    def forward(
        self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], out_size: tuple[int, int] | None = None
    ) -> Tensor:
        if len(feats_a) != len(self.channels) or len(feats_b) != len(self.channels):
            raise ValueError(f"the head takes {len(self.channels)} scales, got {len(feats_a)} and {len(feats_b)}")
        x: Tensor | None = None
        for s, (fa, fb) in enumerate(zip(feats_a, feats_b)):
            if fa.shape != fb.shape or fa.ndim != 4 or fa.shape[1] != self.channels[s]:
                raise ValueError(
                    f"scale {s}: features must both be (B, {self.channels[s]}, H, W), "
                    f"got {tuple(fa.shape)} and {tuple(fb.shape)}"
                )
            d = (self.g[s](fa) - self.g[s](fb)).abs()  # |g(f_A) - g(f_B)|
            if x is not None:
                d = d + F.interpolate(x, size=d.shape[-2:], mode="bilinear", align_corners=False)
            if s + 1 < len(self.channels):
                x = self.fuse[s](d)
            else:
                x = d
        assert x is not None
        logits = self.classifier(x)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


def _check_feature_sets(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], n: int | None = None) -> int:
    if not feats_a or len(feats_a) != len(feats_b):
        raise ValueError(f"feature lists must be non-empty and of equal length, got {len(feats_a)} and {len(feats_b)}")
    m = int(feats_a[0].shape[0])
    if m == 0:
        raise ValueError("the set of pairs is empty (N = 0)")
    if any(int(f.shape[0]) != m for f in [*feats_a, *feats_b]) or (n is not None and n != m):
        raise ValueError(
            f"mismatched pairs: feature sets have {[int(f.shape[0]) for f in feats_a]} (A) and "
            f"{[int(f.shape[0]) for f in feats_b]} (B) items" + (f", masks {n}" if n is not None else "")
        )
    return m


def train_head(
    head: ChangeHead,
    feats_a: Sequence[Tensor],
    feats_b: Sequence[Tensor],
    masks: Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Cross-entropy training of ``head`` (Adam) on precomputed features of labelled pairs; ``masks`` ``(N, H, W)``
    0/1. Returns the mean loss of each epoch."""
    from tqdm import tqdm

    if masks is None:
        raise ValueError("training needs change masks (labels); got masks=None")
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n = _check_feature_sets(feats_a, feats_b, int(masks.shape[0]))
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    target, size = masks.long(), (int(masks.shape[1]), int(masks.shape[2]))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    history = []
    for _ in tqdm(range(epochs), desc="head", disable=not progress, leave=False):
        perm, total = torch.randperm(n, generator=g), 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            logits = head([f[idx].float() for f in feats_a], [f[idx].float() for f in feats_b], size)
            loss = F.cross_entropy(logits, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / n)
    head.eval()
    return history


@torch.no_grad()
def predict(
    head: ChangeHead,
    feats_a: Sequence[Tensor],
    feats_b: Sequence[Tensor],
    size: tuple[int, int],
    *,
    batch_size: int = 64,
) -> Tensor:
    """Predicted change masks ``(N, *size)`` bool (argmax of the two classes)."""
    n = _check_feature_sets(feats_a, feats_b)
    head.eval()
    out = [
        head(
            [f[i : i + batch_size].float() for f in feats_a], [f[i : i + batch_size].float() for f in feats_b], size
        ).argmax(1)
        == 1
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out)


# --- metrics --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChangeMetrics:
    """Change-class metrics from the pixel confusion counts of a whole set (0/0 counts as 1)."""

    f1: float
    iou: float
    precision: float
    recall: float
    accuracy: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den


def change_metrics(pred: Tensor, target: Tensor) -> ChangeMetrics:
    """F1 ``2TP / (2TP + FP + FN)``, IoU ``TP / (TP + FP + FN)``, precision, recall of the change class and
    overall accuracy, over all pixels of ``pred`` and ``target`` (same shape, 0/1)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred and target are empty")
    p, t = pred.bool(), target.bool()
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
    return ChangeMetrics(
        _ratio(2 * tp, 2 * tp + fp + fn),
        _ratio(tp, tp + fp + fn),
        _ratio(tp, tp + fp),
        _ratio(tp, tp + fn),
        (tp + tn) / (tp + fp + fn + tn),
        tp,
        fp,
        fn,
        tn,
    )


# --- files ----------------------------------------------------------------------------------------------------
def save_pairs(path: str | Path, pairs: ChangePairs, *, meta: Mapping[str, Any] | None = None) -> None:
    """Write pairs as safetensors (``a``, ``b`` float32, ``mask`` uint8) with a JSON ``meta`` header entry."""
    from ..models.hub import write_safetensors

    write_safetensors(
        path,
        {"a": pairs.a.contiguous(), "b": pairs.b.contiguous(), "mask": pairs.mask.to(torch.uint8)},
        {"meta": json.dumps(dict(meta or {}))},
    )


def load_pairs(path: str | Path) -> ChangePairs:
    """Read pairs written by ``save_pairs`` (or any safetensors with ``a``, ``b``, ``mask``)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"pairs file {str(p)!r} does not exist")
    t = load_file(str(p))
    missing = [k for k in ("a", "b", "mask") if k not in t]
    if missing:
        raise ValueError(
            f"{p}: lacks {', '.join(missing)}"
            + (" (the change labels)" if "mask" in missing else "")
            + "; a pairs file holds a, b (N, C, H, W) and mask (N, H, W)"
        )
    return ChangePairs(t["a"].float(), t["b"].float(), t["mask"].bool())


def save_head(path: str | Path, head: ChangeHead, card: Mapping[str, Any]) -> Path:
    """``head``'s weights to ``path`` (``.safetensors``) and ``card`` (+ the head's shape) to the ``.json`` beside."""
    from .._utils import atomic_write
    from ..models.hub import write_safetensors

    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"head files end in .safetensors, got {p.name!r}")
    first, last = head.classifier[0], head.classifier[2]
    assert isinstance(first, nn.Conv2d) and isinstance(last, nn.Conv2d)
    shape = {"channels": head.channels, "n_t": head.n_t, "hidden": first.out_channels, "classes": last.out_channels}
    full = {**dict(card), "head": shape}
    write_safetensors(p, {k: v.detach().contiguous() for k, v in head.state_dict().items()}, {"card": json.dumps(full)})
    with atomic_write(p.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(full, indent=2) + "\n")
    return p


def load_head(path: str | Path) -> tuple[ChangeHead, dict[str, Any]]:
    """A head written by ``save_head`` and its card."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"head file {str(p)!r} does not exist")
    with safe_open(str(p), "pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    if "card" not in meta:
        raise ValueError(f"{p}: not a change-detection head (no card in its header)")
    card = json.loads(meta["card"])
    h = card["head"]
    head = ChangeHead(h["channels"], n_t=h["n_t"], hidden=h["hidden"], classes=h["classes"])
    head.load_state_dict(state)
    return head.eval(), card


def build_extractor(spec: Mapping[str, Any]) -> DiffusionFeatures | PixelFeatures:
    """The extractor a head card's ``features`` entry describes: ``{"kind": "pixels"}``, ``{"kind": "diffusion",
    "model": <dpmlab model file or run folder>, "timesteps": [...], "seed": s}`` or ``"kind": "random"`` (the
    model's architecture, weights initialised from ``torch.manual_seed(init_seed)``)."""
    from ..models.hub import load
    from ..schedules import DiscreteVP

    kind = spec.get("kind")
    if kind == "pixels":
        return PixelFeatures(int(spec.get("channels", 1)))
    if kind not in ("diffusion", "random"):
        raise ValueError(f"unknown feature kind {kind!r}; allowed: pixels, diffusion, random")
    den = load(spec["model"])
    net, sch, mspec = getattr(den, "net", None), getattr(den, "schedule", None), getattr(den, "spec", None)
    if not isinstance(net, nn.Module) or not isinstance(sch, DiscreteVP) or mspec is None:
        raise ValueError(f"{spec['model']}: needs a dpmlab diffusion UNet on a discrete schedule")
    if kind == "random":
        torch.manual_seed(int(spec.get("init_seed", 0)))
        net = mspec.build_net()
    return DiffusionFeatures(
        net,
        timesteps=spec.get("timesteps", DEFAULT_TIMESTEPS),
        alphas_cumprod=sch.alphas_cumprod,
        seed=int(spec.get("seed", 0)),
    )


# --- command line ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpmlab.apps.change_detection",
        description="DDPM-CD: change detection with frozen diffusion features.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="make the synthetic scenes: unlabelled PNGs and labelled train/test pairs")
    d.add_argument("--out", required=True, help="folder: scenes/*.png, train.safetensors, test.safetensors")
    d.add_argument("--scenes", type=int, default=5000, help="unlabelled scenes for pre-training (0: none)")
    d.add_argument("--train-pairs", type=int, default=300, help="labelled pairs, MNIST training digits")
    d.add_argument("--test-pairs", type=int, default=300, help="labelled pairs, held-out MNIST digits")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("train", help="train a change head on labelled pairs")
    t.add_argument("--pairs", required=True, help="a pairs .safetensors (from `data`)")
    t.add_argument(
        "--features",
        required=True,
        help="a diffusion model (file or run folder), 'random:<model>' (its architecture, random weights) or 'pixels'",
    )
    t.add_argument("--out", required=True, help="head .safetensors (a .json card is written beside it)")
    t.add_argument("--timesteps", default="50,100,400", help="comma-separated training indices")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    e = sub.add_parser("eval", help="F1 / IoU / precision / recall / accuracy of a head on labelled pairs")
    e.add_argument("--pairs", required=True)
    e.add_argument("--head", required=True)
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quiet", action="store_true")
    return p


def _free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")


def _features_spec(arg: str, timesteps: str, seed: int) -> dict[str, Any]:
    if arg == "pixels":
        return {"kind": "pixels"}
    try:
        ts = [int(v) for v in timesteps.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated integers, got {timesteps!r}") from None
    kind, model = ("random", arg[len("random:") :]) if arg.startswith("random:") else ("diffusion", arg)
    if not Path(model).exists():
        raise ValueError(f"--features {arg!r}: model {model!r} does not exist (or use 'pixels')")
    return {"kind": kind, "model": model, "timesteps": ts, "seed": seed, "init_seed": seed}


def _cmd_data(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if min(a.scenes, a.train_pairs, a.test_pairs) < 0 or a.train_pairs + a.test_pairs + a.scenes == 0:
        raise ValueError("--scenes, --train-pairs, --test-pairs must be >= 0 and not all 0")
    todo = [
        (out / "train.safetensors", a.train_pairs),
        (out / "test.safetensors", a.test_pairs),
        (out / "scenes", a.scenes),
    ]
    for path, n in todo:
        if n:
            _free(path, a.overwrite)
    cfg = SceneConfig()
    meta = {"config": cfg.to_dict(), "seed": a.seed}
    if a.scenes:
        write_scenes(out / "scenes", make_scenes(a.scenes, split="train", seed=a.seed, config=cfg))
    for (path, n), split, k in zip(todo[:2], ("train", "test"), (1, 2)):
        if n:
            save_pairs(path, make_pairs(n, split=split, seed=a.seed + k, config=cfg), meta={**meta, "split": split})
    print(f"wrote {a.scenes} scenes, {a.train_pairs} train and {a.test_pairs} test pairs to {out}")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name!r}")
    _free(out, a.overwrite)
    spec = _features_spec(a.features, a.timesteps, a.seed)
    pairs = load_pairs(a.pairs)
    ext = build_extractor(spec)
    fa, fb = (extract(ext, x, progress=not a.quiet) for x in (pairs.a, pairs.b))
    head = ChangeHead(ext.channels, n_t=max(1, len(ext.timesteps)))
    losses = train_head(
        head, fa, fb, pairs.mask, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, progress=not a.quiet
    )
    save_head(
        out,
        head,
        {
            "paper": "DDPM-CD (Bandara, Nair & Patel, WACV 2025)",
            "features": spec,
            "pairs": str(a.pairs),
            "pairs_n": len(pairs),
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "seed": a.seed,
            "losses": losses,
        },
    )
    print(f"final loss {losses[-1]:.4f}; head written to {out}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    js = Path(a.json) if a.json else None
    if js is not None:
        _free(js, a.overwrite)
    head, card = load_head(a.head)
    pairs = load_pairs(a.pairs)
    ext = build_extractor(card["features"])
    fa, fb = (extract(ext, x, progress=not a.quiet) for x in (pairs.a, pairs.b))
    size = (int(pairs.mask.shape[1]), int(pairs.mask.shape[2]))
    m = change_metrics(predict(head, fa, fb, size), pairs.mask).to_dict()
    print(json.dumps(m))
    if js is not None:
        from .._utils import atomic_write

        with atomic_write(js) as tmp:
            tmp.write_text(json.dumps(m, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)
    run = {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval}[a.cmd]
    try:
        return run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

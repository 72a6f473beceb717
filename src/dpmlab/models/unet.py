"""A small UNet for diffusion on small images, with feature hooks.

Architecture after DDPM (Ho et al. 2020, arXiv 2006.11239, Appendix B) and ADM (Dhariwal & Nichol
2021, arXiv 2105.05233, Sec. 3): residual blocks ``GroupNorm -> SiLU -> Conv`` with the time (and
class) embedding injected as an adaptive scale/shift of the second norm ("AdaGN", ADM eq. in Sec. 3),
zero-initialised output convolutions, self-attention at the lowest resolution (and in the middle), and
a class embedding table with one extra *null* index ``num_classes`` so that one network serves both
the conditional and the unconditional model of classifier-free guidance (Ho & Salimans 2022,
arXiv 2207.12598).

Inputs whose side is not divisible by ``2 ** (levels - 1)`` are zero-padded internally and the output
is cropped back (e.g. 28x28 with 4 levels runs at 32x32; with 3 levels it runs at 28 -> 14 -> 7).

Feature hooks (``UNet.hooks``), used by the editing / analysis / pruning methods:

* ``capture``: record named block outputs; ``"mid"`` is the bottleneck, the "h-space" of Kwon et al.
  2023 (arXiv 2210.10960).
* ``bottleneck``: a callable ``(h, t_emb) -> h'`` replacing the bottleneck output.
* ``skip_scale``: per skip connection factors (skip ``k`` counted from the first, highest-resolution
  one), as in ScaleLong (Huang et al. 2023, arXiv 2310.13545) / FreeU.
* ``bypass``: blocks from ``prunable_blocks()`` replaced by the identity (structural pruning,
  e.g. LD-Pruner, Castells et al. 2024, arXiv 2404.11936).

Concatenated image conditioning (``cond_channels > 0``): ``x_cond`` ``(B, cond_channels, H, W)`` is stacked
onto the input channels before the first convolution, as in SR3 / ADM's ``SuperResModel`` and DiffuseVAE's
conditional DDPM; ``x_cond=None`` feeds zeros (the null condition of classifier-free guidance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import dataclass_from_dict

__all__ = ["UNetConfig", "UNet", "FeatureHooks", "timestep_embedding", "check_labels"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) times ``t`` ``(B,) -> (B, dim)`` (DDPM / ADM
    ``timestep_embedding``; Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def check_labels(label: Tensor | None, num_classes: int, batch: int, device: torch.device) -> Tensor:
    """Class indices ``(B,)`` in ``[0, num_classes]`` (``num_classes`` is the null class; ``None`` means
    all null)."""
    if label is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if num_classes == 0:
        raise ValueError("this network is unconditional (num_classes=0); it takes no label")
    label = torch.as_tensor(label, device=device)
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label must be an integer tensor, got {label.dtype}")
    if label.ndim == 0:
        label = label.expand(batch)
    if label.shape != (batch,):
        raise ValueError(f"label must have shape ({batch},), got {tuple(label.shape)}")
    if bool(((label < 0) | (label > num_classes)).any()):
        raise ValueError(
            f"labels must be in [0, {num_classes}] ({num_classes} = null class), "
            f"got values in [{int(label.min())}, {int(label.max())}]"
        )
    return label.long()


@dataclass(frozen=True)
class UNetConfig:
    """Configuration of ``UNet`` (saved as JSON next to the weights)."""

    image_size: int = 32  # side of the (square) input; need not be a power of two
    in_channels: int = 1  # image channels (the output has the same number)
    model_channels: int = 32  # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # channels per level, relative to model_channels
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    num_heads: int = 4  # attention heads at the lowest resolution and in the middle
    dropout: float = 0.0  # dropout inside the residual blocks
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 plus null class num_classes
    groups: int = 8  # GroupNorm groups (must divide every channel count)
    time_scale: float = 1.0  # multiplies the network's time before embedding (e.g. 1000 for t in [0, 1])
    cond_channels: int = 0  # extra input channels ``x_cond`` concatenated to ``x`` (0: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not (isinstance(self.cond_channels, int) and self.cond_channels >= 0):
            raise ValueError(f"UNetConfig.cond_channels must be an int >= 0, got {self.cond_channels!r}")
        for name in ("image_size", "in_channels", "model_channels", "num_heads", "groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult!r}")
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"UNetConfig.num_classes must be >= 0, got {self.num_classes}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"UNetConfig.time_scale must be positive, got {self.time_scale}")
        for m in self.channel_mult:
            c = self.model_channels * m
            if c % self.groups:
                raise ValueError(f"UNetConfig.groups={self.groups} does not divide the {c} channels of a level")
            if c % self.num_heads:
                raise ValueError(f"UNetConfig.num_heads={self.num_heads} does not divide {c} channels")

    @property
    def padded_size(self) -> int:
        """Side the network runs at: ``image_size`` rounded up to a multiple of ``2 ** (levels - 1)``."""
        k = 2 ** (len(self.channel_mult) - 1)
        return -(-self.image_size // k) * k

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        return dataclass_from_dict(cls, d, what="UNetConfig", tuple_fields=("channel_mult",))


@dataclass
class FeatureHooks:
    """What ``UNet.hooks`` installs: captured features are appended to ``features[name]`` per call."""

    capture: frozenset[str] = frozenset()
    bottleneck: Callable[[Tensor, Tensor], Tensor] | None = None
    skip_scale: Mapping[int, float] = field(default_factory=dict)
    bypass: frozenset[str] = frozenset()
    features: dict[str, list[Tensor]] = field(default_factory=dict)


def _zero_init(conv: nn.Conv2d) -> None:
    """Zero a conv's weight and bias (ADM's zero-initialised output layers)."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ResBlock(nn.Module):
    """ADM residual block: ``h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale) + shift; out = skip(x) +
    conv(dropout(SiLU(h)))`` with the last conv zero-initialised."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        _zero_init(self.conv2)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.same_shape = c_in == c_out

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels, residual, zero-initialised projection."""

    def __init__(self, c: int, groups: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        _zero_init(self.proj)
        self.heads = heads
        self.same_shape = True

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, C/heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.same_shape = False

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.same_shape = False

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """``eps = net(x, t, label=None, x_cond=None)``: ``x`` ``(B, C, H, W)`` with ``H = W = image_size``, ``t``
    ``(B,)`` (the network's own time: the training index for discrete schedules), ``label`` ``(B,)`` ints in
    ``[0, num_classes]`` or ``None`` (the null class), ``x_cond`` ``(B, cond_channels, H, W)`` or ``None``
    (zeros; only for ``cond_channels > 0``). Returns ``(B, C, H, W)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, g = cfg.model_channels, cfg.groups
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch, 3, padding=1)
        levels = len(cfg.channel_mult)
        self.down = nn.ModuleList()
        down_names: list[str] = []
        skip_ch = [ch]
        c = ch
        for lvl, mult in enumerate(cfg.channel_mult):
            for k in range(cfg.num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, emb_dim, g, cfg.dropout))
                c = ch * mult
                down_names.append(f"down.{lvl}.res{k}")
                if lvl == levels - 1:
                    self.down.append(AttnBlock(c, g, cfg.num_heads))
                    down_names.append(f"down.{lvl}.attn{k}")
                skip_ch.append(c)
            if lvl != levels - 1:
                self.down.append(Downsample(c))
                down_names.append(f"down.{lvl}.downsample")
                skip_ch.append(c)
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, emb_dim, g, cfg.dropout),
                AttnBlock(c, g, cfg.num_heads),
                ResBlock(c, c, emb_dim, g, cfg.dropout),
            ]
        )
        self.up = nn.ModuleList()
        up_names: list[str] = []
        for lvl in reversed(range(levels)):
            mult = cfg.channel_mult[lvl]
            for k in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(c + skip_ch.pop(), ch * mult, emb_dim, g, cfg.dropout))
                c = ch * mult
                up_names.append(f"up.{lvl}.res{k}")
                if lvl == levels - 1:
                    self.up.append(AttnBlock(c, g, cfg.num_heads))
                    up_names.append(f"up.{lvl}.attn{k}")
            if lvl != 0:
                self.up.append(Upsample(c))
                up_names.append(f"up.{lvl}.upsample")
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        _zero_init(self.conv_out)
        self.down_names, self.up_names = tuple(down_names), tuple(up_names)
        self._skip_set = frozenset(self.skip_sources())
        self.num_skips = len(self._skip_set)
        self._hooks: FeatureHooks | None = None

    def skip_sources(self) -> list[str]:
        """The block whose output feeds skip connection ``k`` (``k = 0`` is the highest resolution)."""
        names = self.down_names
        return ["conv_in", *(n for i, n in enumerate(names) if i + 1 == len(names) or ".attn" not in names[i + 1])]

    # --- hooks -----------------------------------------------------------------------------------
    def block_names(self) -> list[str]:
        """Names that ``capture`` accepts, in forward order."""
        return ["conv_in", *self.down_names, *(f"mid.{i}" for i in range(len(self.mid))), "mid", *self.up_names, "out"]

    def prunable_blocks(self) -> list[str]:
        """Blocks that keep their input's shape, so the identity can replace them (``bypass``)."""
        blocks = [*zip(self.down_names, self.down), *zip(self.up_names, self.up)]
        mids = [(f"mid.{i}", m) for i, m in enumerate(self.mid)]
        return [
            n
            for n, m in blocks[: len(self.down_names)] + mids + blocks[len(self.down_names) :]
            if getattr(m, "same_shape", False)
        ]

    @contextlib.contextmanager
    def hooks(
        self,
        *,
        capture: Iterable[str] = (),
        bottleneck: Callable[[Tensor, Tensor], Tensor] | None = None,
        skip_scale: Mapping[int, float] | None = None,
        bypass: Iterable[str] = (),
    ) -> Iterator[dict[str, list[Tensor]]]:
        """Install feature hooks for the duration of the ``with`` block; yields the dict of captured
        features (``name -> [tensor per forward call]``). Names: ``block_names()``; skip indices
        ``0 .. num_skips - 1``; bypassable blocks: ``prunable_blocks()``."""
        capture, bypass = frozenset(capture), frozenset(bypass)
        bad = sorted(capture - set(self.block_names()))
        if bad:
            raise ValueError(f"unknown blocks to capture: {', '.join(bad)}; allowed: {', '.join(self.block_names())}")
        bad = sorted(bypass - set(self.prunable_blocks()))
        if bad:
            raise ValueError(
                f"blocks {', '.join(bad)} cannot be bypassed; prunable: {', '.join(self.prunable_blocks())}"
            )
        scales = dict(skip_scale or {})
        bad_k = sorted(k for k in scales if not (isinstance(k, int) and 0 <= k < self.num_skips))
        if bad_k:
            raise ValueError(f"skip indices {bad_k} out of range [0, {self.num_skips})")
        if self._hooks is not None:
            raise RuntimeError("UNet hooks are already installed; nested hooks are not supported")
        self._hooks = FeatureHooks(capture, bottleneck, scales, bypass)
        try:
            yield self._hooks.features
        finally:
            self._hooks = None

    def _record(self, name: str, h: Tensor) -> None:
        hk = self._hooks
        if hk is not None and name in hk.capture:
            hk.features.setdefault(name, []).append(h.detach())

    def _run(self, name: str, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        hk = self._hooks
        if hk is None or name not in hk.bypass:
            h = block(h, emb)
        self._record(name, h)
        return h

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None, x_cond: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise ValueError(
                f"UNet expects (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        if cfg.cond_channels:
            want = (b, cfg.cond_channels, cfg.image_size, cfg.image_size)
            if x_cond is not None and tuple(x_cond.shape) != want:
                raise ValueError(f"UNet x_cond must have shape {want}, got {tuple(x_cond.shape)}")
            x = torch.cat(
                [x, torch.zeros(want, dtype=x.dtype, device=x.device) if x_cond is None else x_cond.to(x.dtype)], dim=1
            )
        elif x_cond is not None:
            raise ValueError("this UNet takes no x_cond (cond_channels=0)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_embed(timestep_embedding(t * cfg.time_scale, cfg.model_channels).to(x.dtype))  # (B, 4ch)
        if self.label_embed is not None:
            emb = emb + self.label_embed(check_labels(label, cfg.num_classes, b, x.device))
        elif label is not None:
            check_labels(label, 0, b, x.device)  # raises: unconditional network
        pad = cfg.padded_size - cfg.image_size
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        h = self.conv_in(x)
        self._record("conv_in", h)
        skips = [h]
        for name, block in zip(self.down_names, self.down):
            h = self._run(name, block, h, emb)
            if name in self._skip_set:
                skips.append(h)
        for i, block in enumerate(self.mid):
            h = self._run(f"mid.{i}", block, h, emb)
        hk = self._hooks
        if hk is not None and hk.bottleneck is not None:
            h = hk.bottleneck(h, emb)
        self._record("mid", h)
        for name, block in zip(self.up_names, self.up):
            if ".res" in name:
                s = skips.pop()
                if hk is not None and len(skips) in hk.skip_scale:
                    s = s * hk.skip_scale[len(skips)]
                h = torch.cat([h, s], dim=1)
            h = self._run(name, block, h, emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if pad:
            h = h[:, :, : cfg.image_size, : cfg.image_size]
        self._record("out", h)
        return h

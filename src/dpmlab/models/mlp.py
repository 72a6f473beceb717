"""A residual MLP denoiser for low-dimensional data (2-D toy sets, flattened tiny images).

``out = net(x, t, label=None)``: the input ``(B, *data_shape)`` is flattened, the sinusoidal time
embedding (DDPM, Ho et al. 2020, arXiv 2006.11239; the Transformer's positional encoding) goes through
a small MLP and is added, with an optional class embedding that has an extra *null* class index
``num_classes`` (classifier-free guidance, Ho & Salimans 2022, arXiv 2207.12598), to every residual
block ``h = h + W2 SiLU(W1 LN(h) + emb)``. The last layer is zero-initialised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import dataclass_from_dict
from .unet import check_labels, timestep_embedding

__all__ = ["MLPConfig", "MLP"]


@dataclass(frozen=True)
class MLPConfig:
    """Configuration of ``MLP`` (saved as JSON next to the weights)."""

    data_shape: tuple[int, ...] = (2,)  # shape of one sample; flattened inside
    width: int = 128  # hidden width
    depth: int = 3  # residual blocks
    time_dim: int = 64  # sinusoidal embedding size
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 plus null class num_classes
    time_scale: float = 1.0  # multiplies the network's time before embedding (e.g. 1000 for t in [0, 1])

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        if not self.data_shape or min(self.data_shape) < 1:
            raise ValueError(f"MLPConfig.data_shape must be positive ints, got {self.data_shape!r}")
        for name in ("width", "depth", "time_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MLPConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_classes < 0:
            raise ValueError(f"MLPConfig.num_classes must be >= 0, got {self.num_classes}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"MLPConfig.time_scale must be positive, got {self.time_scale}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_shape"] = list(self.data_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MLPConfig:
        return dataclass_from_dict(cls, d, what="MLPConfig", tuple_fields=("data_shape",))


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + emb))


class MLP(nn.Module):
    """``out = net(x, t, label=None)``, ``x`` ``(B, *data_shape)``, ``t`` ``(B,)``, ``label`` ``(B,)`` ints
    in ``[0, num_classes]`` or ``None`` (the null class); returns ``(B, *data_shape)``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = cfg = config
        dim = math.prod(cfg.data_shape)
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, cfg.width) if cfg.num_classes else None
        self.inp = nn.Linear(dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        cfg = self.config
        if tuple(x.shape[1:]) != cfg.data_shape:
            raise ValueError(f"MLP expects (B, {', '.join(map(str, cfg.data_shape))}), got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_embed(timestep_embedding(t * cfg.time_scale, cfg.time_dim).to(x.dtype))  # (B, width)
        if self.label_embed is not None:
            emb = emb + self.label_embed(check_labels(label, cfg.num_classes, b, x.device))
        elif label is not None:
            check_labels(label, 0, b, x.device)  # raises: unconditional network
        h = self.inp(x.reshape(b, -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h))).reshape(x.shape)

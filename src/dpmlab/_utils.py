"""Small shared helpers — the only copy of each in the package.

* ``append_dims``      broadcast a per-sample ``(B,)`` tensor against ``(B, ...)`` data.
* ``f64``              a float64 tensor from a number, list or tensor.
* ``interp1d``         monotone piecewise-linear interpolation with linear extrapolation.
* ``counter_normal``   counter-based (stateless) Gaussian noise: the value for sample ``i`` depends
                       only on ``(seed, i, stream)``, never on batch size, order or device.
* ``atomic_write``     write a file through a temporary sibling and ``os.replace``.
* ``atomic_folder``    the same for a folder (e.g. a diffusers ``save_pretrained`` folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "f64",
    "interp1d",
    "counter_normal",
    "atomic_write",
    "atomic_folder",
    "state_dtype",
    "dataclass_from_dict",
]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to ``v`` so it has ``ndim`` dims: ``(B,) -> (B, 1, ..., 1)``."""
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"cannot broadcast a tensor with {v.ndim} dims to {ndim} dims")
    return v.reshape(*v.shape, *([1] * extra))


def f64(x: float | Sequence[float] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """``x`` as a float64 tensor (no copy when it already is one on ``device``)."""
    if isinstance(x, Tensor):
        return x.to(dtype=torch.float64, device=device if device is not None else x.device)
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solver state is kept in: the model's dtype, but never below float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"sampler state must be floating point, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def interp1d(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x``; linear extrapolation outside.

    ``xp`` must be strictly increasing (1-d, length >= 2). The result is exact on the knots, so a
    piecewise-linear function and its inverse built from the same knots round-trip exactly.
    """
    if xp.ndim != 1 or xp.numel() < 2 or xp.shape != fp.shape:
        raise ValueError("interp1d needs 1-d knots xp, fp of equal length >= 2")
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x_lo, x_hi = xp[idx - 1], xp[idx]
    f_lo, f_hi = fp[idx - 1], fp[idx]
    w = (x - x_lo) / (x_hi - x_lo)
    return f_lo + w * (f_hi - f_lo)


# --- counter-based noise ------------------------------------------------------------------------
# splitmix64 on int64 tensors: multiplication wraps modulo 2**64 and the right shifts are made
# logical with a mask, so results equal the reference unsigned 64-bit algorithm bit for bit.
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64
_M1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_M2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _srl(z: Tensor, k: int) -> Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _key(seed: int, index: Tensor, stream: int) -> Tensor:
    k = _splitmix64(torch.full_like(index, int(seed) & 0x7FFFFFFFFFFFFFFF))
    k = _splitmix64(k ^ index)
    return _splitmix64(k ^ int(stream))


def counter_normal(
    seed: int,
    index: Tensor,
    stream: int,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise of shape ``(len(index), *shape)``, row ``b`` a pure function of
    ``(seed, index[b], stream)``: reproducible across batch sizes, orderings and devices.

    ``index`` holds the per-sample indices (int64, shape ``(B,)``); ``stream`` separates the draws of
    one sample (0 for the starting noise, 1 + step for a solver's step noise, ...).
    """
    index = torch.as_tensor(index, dtype=torch.int64, device=device)
    n = 1
    for s in shape:
        n *= int(s)
    key = _key(seed, index, stream)[:, None]  # (B, 1)
    j = torch.arange(n, dtype=torch.int64, device=index.device)[None, :]  # (1, n)
    a = _splitmix64(key + 2 * j)
    b = _splitmix64(key + 2 * j + 1)
    scale = 2.0**-53
    u1 = (_srl(a, 11).to(torch.float64) + 1.0) * scale  # (0, 1]
    u2 = _srl(b, 11).to(torch.float64) * scale  # [0, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)  # Box-Muller
    return z.reshape(index.shape[0], *shape).to(dtype)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically,
    on any error it is deleted — a file the user asked for is never left half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=suffix or target.suffix
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and writers such as safetensors) create 0600 files; give the result normal permissions
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``atomic_write`` for a folder: yield a temporary sibling folder; on success it replaces ``path``
    (an existing folder there is removed first), on any error it is deleted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_orphans(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary siblings ``.{name}.{pid}.*`` of ``target`` that ``atomic_write`` /
    ``atomic_folder`` left behind when process ``pid`` was killed (SIGKILL, power loss); those of live
    processes are kept. Returns what was removed."""
    t = Path(target)
    removed: list[Path] = []
    if not t.parent.is_dir():
        return removed
    head = f".{t.name}."
    for p in t.parent.iterdir():
        if not p.name.startswith(head):
            continue
        pid = p.name[len(head) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: Mapping[str, Any], *, what: str, tuple_fields: Sequence[str] = ()) -> T:
    """Rebuild a config dataclass from its JSON dict; unknown keys raise ``ValueError`` naming them and
    the allowed ones; ``tuple_fields`` (JSON lists) become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**{k: tuple(v) if k in tuple_fields else v for k, v in d.items()})

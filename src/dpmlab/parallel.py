"""Exact multi-process sampling: shard sample *indices* across processes, gather in index order.

dpmlab's noise is counter-based — sample ``i``'s starting noise and every step noise depend only on
``(seed, i)`` (``dpmlab._utils.counter_normal``, ``dpmlab.solvers.SeededNoise``) — so a rank that
samples rows ``lo .. hi-1`` with ``dpmlab.sample(..., n=hi-lo, index_offset=lo)`` produces exactly the
rows a single process would. Shards are contiguous blocks cut on ``batch_size`` boundaries, so every
network batch holds the same samples as in the one-process run with the same ``batch_size``: the
result is then bit-identical for any world size (CPU kernels sum in a batch-size dependent order, so
*without* ``batch_size`` a network's rows agree only to float rounding, ~1e-6; per-row models such as
the analytic mixtures are exact either way). See docs/parallel.md.

Two entry points:

* ``sample_sharded(model, n, processes=N, ...)``: from one Python process; spawns ``N - 1`` workers
  (``torch.multiprocessing``, start method ``spawn``), the calling process is rank 0; each worker writes
  its shard as safetensors into a private temporary folder, rank 0 assembles. No sockets.
* ``sample_distributed(model, n, ...)``: under an external launcher (``torchrun``,
  ``accelerate launch``) that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
  each rank samples its shard, shards are gathered on rank 0 over a ``gloo`` process group; rank 0
  returns the whole tensor (and writes it to ``out`` if given), the other ranks return ``None``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._utils import atomic_write
from .api import _per_sample, _whole
from .api import sample as _sample

__all__ = ["shard_bounds", "sample_shard", "sample_sharded", "sample_distributed"]

_NOT_FORWARDED = ("index_offset", "callback")


def shard_bounds(n: int, world_size: int, batch_size: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` row ranges, one per rank, in rank order, cut on ``batch_size`` boundaries.

    The ``ceil(n / batch_size)`` batches (rows, without ``batch_size``) are split as evenly as
    possible; the first ranks take the extra one. Every rank gets at least one batch.
    """
    _whole("n", n, 1)
    _whole("processes", world_size, 1)
    if batch_size is not None:
        _whole("batch_size", batch_size, 1)
    unit = batch_size or 1
    batches = -(-n // unit)
    if world_size > batches:
        what = f"{batches} batches of batch_size={batch_size}" if batch_size else f"n={n} samples"
        raise ValueError(f"processes={world_size} exceeds the {what}; use at most {batches} processes")
    base, extra = divmod(batches, world_size)
    out, b = [], 0
    for r in range(world_size):
        nb = base + (1 if r < extra else 0)
        out.append((min(n, b * unit), min(n, (b + nb) * unit)))
        b += nb
    return out


def _check_kwargs(kw: Mapping[str, Any]) -> None:
    for k in _NOT_FORWARDED:
        if k in kw:
            raise ValueError(f"{k}= is not supported by sharded sampling (set per rank, not shared across processes)")


def _slice_kwargs(kw: Mapping[str, Any], n: int, lo: int, hi: int) -> dict[str, Any]:
    """``sample`` keywords for rows ``lo .. hi-1``: per-sample ``cond`` entries (a tensor with ``n``
    rows, a list of ``n`` prompts) and ``x_T`` are sliced; everything else is shared."""
    out = dict(kw)
    cond = kw.get("cond")
    if cond is not None:
        if not isinstance(cond, Mapping):
            raise ValueError(f"cond must be a mapping of keyword arguments, got {type(cond).__name__}")
        out["cond"] = {k: v[lo:hi] if _per_sample(v, n) else v for k, v in cond.items()}
    x_t = kw.get("x_T")
    if x_t is not None:
        if not isinstance(x_t, Tensor) or not x_t.ndim or x_t.shape[0] != n:
            got = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(f"x_T must be a tensor with n={n} rows, got {got}")
        out["x_T"] = x_t[lo:hi]
    return out


def sample_shard(model: Any, n: int, *, rank: int, world_size: int, **sample_kwargs: Any) -> Tensor:
    """Rank ``rank``'s rows of ``dpmlab.sample(model, n, **sample_kwargs)`` (bounds from ``shard_bounds``).

    Pure and in-process: the building block of both launchers, usable with any other launcher.
    """
    _check_kwargs(sample_kwargs)
    _whole("world_size", world_size, 1)
    _whole("rank", rank, 0, world_size - 1)
    lo, hi = shard_bounds(n, world_size, sample_kwargs.get("batch_size"))[rank]
    return _sample(model, hi - lo, index_offset=lo, **_slice_kwargs(sample_kwargs, n, lo, hi))


def _save(t: Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({"x": t.detach().cpu().contiguous()}, str(tmp))


def _worker(i: int, model: Any, n: int, world: int, threads: int, folder: str, kw: dict[str, Any]) -> None:
    torch.set_num_threads(threads)
    rank = i + 1  # the parent is rank 0
    _save(sample_shard(model, n, rank=rank, world_size=world, **kw), Path(folder) / f"shard-{rank:05d}.safetensors")


def sample_sharded(model: Any, n: int, *, processes: int, threads_per_process: int = 1, **sample_kwargs: Any) -> Tensor:
    """``dpmlab.sample(model, n, **sample_kwargs)`` computed by ``processes`` processes; same rows, same order.

    ``model``: a name (loaded in every worker) or a picklable denoiser (sent to the workers).
    ``threads_per_process``: torch threads of each worker and of this process while it samples rank 0's
    shard. Bit-identical to one process with the same ``batch_size`` (see the module docstring).
    ``processes=1`` samples in this process without spawning.
    """
    _whole("processes", processes, 1)
    _whole("threads_per_process", threads_per_process, 1)
    _check_kwargs(sample_kwargs)
    shard_bounds(n, processes, sample_kwargs.get("batch_size"))  # validate before spawning
    old = torch.get_num_threads()
    if processes == 1:
        torch.set_num_threads(threads_per_process)
        try:
            return sample_shard(model, n, rank=0, world_size=1, **sample_kwargs)
        finally:
            torch.set_num_threads(old)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dpmlab-shards-") as folder:
        try:
            ctx = mp.start_processes(
                _worker,
                args=(model, n, processes, threads_per_process, folder, dict(sample_kwargs)),
                nprocs=processes - 1,
                join=False,
                start_method="spawn",
            )
        except (AttributeError, TypeError, pickle.PicklingError) as e:
            raise ValueError(
                f"the model and sample arguments must be picklable to reach the worker processes "
                f"(or pass the model by name): {e}"
            ) from e
        try:
            torch.set_num_threads(threads_per_process)
            try:
                first = sample_shard(model, n, rank=0, world_size=processes, **sample_kwargs)
            finally:
                torch.set_num_threads(old)
            while not ctx.join():  # re-raises a worker's exception with its traceback
                pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        from safetensors.torch import load_file

        rest = [load_file(str(Path(folder) / f"shard-{r:05d}.safetensors"))["x"] for r in range(1, processes)]
    return torch.cat([first, *[t.to(first.device) for t in rest]])


def sample_distributed(
    model: Any,
    n: int,
    *,
    out: str | os.PathLike[str] | None = None,
    timeout_s: float = 1800.0,
    **sample_kwargs: Any,
) -> Tensor | None:
    """Sampling under ``torchrun`` / ``accelerate launch``: every rank calls this with the same arguments.

    Reads ``RANK`` and ``WORLD_SIZE`` from the environment (one process: ``0`` / ``1``); joins (or
    reuses) a ``gloo`` process group (``MASTER_ADDR`` / ``MASTER_PORT`` as the launcher sets them),
    samples its shard, gathers on rank 0. Rank 0 returns the ``(n, *shape)`` tensor and, with ``out``,
    writes it atomically as safetensors (key ``"samples"``); other ranks return ``None``.
    """
    import torch.distributed as dist

    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(
            f"RANK and WORLD_SIZE must be whole numbers, got {os.environ.get('RANK')!r}, "
            f"{os.environ.get('WORLD_SIZE')!r}"
        ) from e
    _whole("WORLD_SIZE", world, 1)
    _whole("RANK", rank, 0, world - 1)
    if out is not None and Path(out).suffix != ".safetensors":
        raise ValueError(f"out must end in .safetensors, got {str(out)!r}")
    shard_bounds(n, world, sample_kwargs.get("batch_size"))
    if world == 1:
        whole = sample_shard(model, n, rank=0, world_size=1, **sample_kwargs)
    else:
        own = not dist.is_initialized()
        if own:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            mine = sample_shard(model, n, rank=rank, world_size=world, **sample_kwargs).cpu().contiguous()
            bounds = shard_bounds(n, world, sample_kwargs.get("batch_size"))
            rows = max(hi - lo for lo, hi in bounds)
            pad = torch.zeros((rows, *mine.shape[1:]), dtype=mine.dtype)
            pad[: mine.shape[0]] = mine
            gathered = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
            dist.gather(pad, gathered, dst=0)
        finally:
            if own:
                dist.destroy_process_group()
        if rank != 0:
            return None
        assert gathered is not None
        whole = torch.cat([g[: hi - lo] for g, (lo, hi) in zip(gathered, bounds, strict=True)])
    if out is not None:
        from safetensors.torch import save_file

        with atomic_write(out) as tmp:
            save_file({"samples": whole.detach().cpu().contiguous()}, str(tmp))
    return whole

"""Exact multi-process sampling (dpmlab.parallel): sharding by sample index reproduces one process's
rows bit for bit — in-process shards for many world sizes, real spawned workers (1 vs 2 processes),
the gloo launcher path, per-sample labels / prompts / x_T sharded consistently, and input errors."""

import os
import socket

import pytest
import torch

import dpmlab
from dpmlab.parallel import sample_distributed, sample_shard, sample_sharded, shard_bounds

torch.set_num_threads(1)


def test_shard_bounds_cover_in_order_on_batch_boundaries():
    assert shard_bounds(7, 2) == [(0, 4), (4, 7)]
    assert shard_bounds(10, 3, batch_size=3) == [(0, 6), (6, 9), (9, 10)]  # 4 batches: 2, 1, 1
    for n in (1, 5, 9):
        for w in range(1, n + 1):
            b = shard_bounds(n, w)
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(w - 1))
            assert all(hi > lo for lo, hi in b)


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "sde_dpm_solver_pp", "unipc"])
def test_in_process_shards_are_bit_identical(solver):
    one = dpmlab.sample("gmm16", 7, solver=solver, nfe=6, seed=5)
    for w in (2, 3, 7):
        parts = [sample_shard("gmm16", 7, rank=r, world_size=w, solver=solver, nfe=6, seed=5) for r in range(w)]
        assert torch.equal(torch.cat(parts), one), (solver, w)
    # and the offset really moves the noise: a shard is not the first rows again
    assert not torch.equal(dpmlab.sample("gmm16", 3, solver=solver, nfe=6, seed=5, index_offset=4), one[:3])


def test_labels_prompts_and_x_t_are_sharded_with_their_rows():
    m = dpmlab.load("mnist")
    lab = torch.tensor([3, 1, 4, 1, 5])
    one = dpmlab.sample(m, 5, solver="ddim", nfe=2, seed=2, cond={"label": lab}, batch_size=2)
    parts = [
        sample_shard(m, 5, rank=r, world_size=2, solver="ddim", nfe=2, seed=2, cond={"label": lab}, batch_size=2)
        for r in range(2)
    ]
    assert torch.equal(torch.cat(parts), one)
    # a per-sample list (e.g. prompts) is sliced too: a recording model sees each rank's own items
    seen = []

    def rec(x, t, tag=None):
        if tag is not None:
            seen.append(list(tag))
        return torch.zeros_like(x)

    rec.schedule = m.schedule  # type: ignore[attr-defined]
    rec.data_shape = (2,)  # type: ignore[attr-defined]
    tags = ["a", "b", "c", "d", "e"]
    for r in range(2):
        sample_shard(rec, 5, rank=r, world_size=2, solver="ddim", nfe=1, cond={"tag": tags})
    assert seen == [["a", "b", "c"], ["d", "e"]]
    xt = torch.randn(5, 2)
    got = [sample_shard(rec, 5, rank=r, world_size=2, solver="ddim", nfe=1, x_T=xt) for r in range(2)]
    assert torch.equal(torch.cat(got), dpmlab.sample(rec, 5, solver="ddim", nfe=1, x_T=xt))


def test_spawned_workers_match_one_process_ddpm_and_ddim():
    one = dpmlab.sample("gmm16", 7, solver="ddpm", nfe=5, seed=11)
    assert torch.equal(sample_sharded("gmm16", 7, processes=1, solver="ddpm", nfe=5, seed=11), one)
    assert torch.equal(sample_sharded("gmm16", 7, processes=2, solver="ddpm", nfe=5, seed=11), one)  # 7 = 4+3
    lab = torch.tensor([7, 0, 2, 9])
    m1 = dpmlab.sample("mnist", 4, solver="ddim", nfe=2, seed=1, cond={"label": lab}, batch_size=1)
    m2 = sample_sharded("mnist", 4, processes=2, solver="ddim", nfe=2, seed=1, cond={"label": lab}, batch_size=1)
    assert torch.equal(m2, m1)


def test_worker_error_is_raised_in_the_caller():
    # rank 1's shard holds an impossible label: the worker fails, the caller re-raises (and does not hang)
    with pytest.raises(Exception, match="index out of range|label"):
        sample_sharded("mnist", 2, processes=2, solver="ddim", nfe=1, cond={"label": torch.tensor([1, 99])})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(i, port):
    os.environ.update(RANK=str(i + 1), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert sample_distributed("gmm16", 5, solver="ddpm", nfe=4, seed=3) is None  # not rank 0


def test_gloo_launcher_path_matches_one_process(tmp_path, monkeypatch):
    # what torchrun / accelerate launch do: every rank gets RANK/WORLD_SIZE/MASTER_*; here rank 0 is this process
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    port = _free_port()
    ctx = mp.start_processes(_launched, args=(port,), nprocs=1, join=False, start_method="spawn")
    for k, v in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    got = sample_distributed("gmm16", 5, out=tmp_path / "s.safetensors", solver="ddpm", nfe=4, seed=3)
    while not ctx.join():
        pass
    one = dpmlab.sample("gmm16", 5, solver="ddpm", nfe=4, seed=3)
    assert got is not None and torch.equal(got, one)
    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["samples"], one)
    assert not torch.distributed.is_initialized()  # the group it created is torn down


def test_bad_inputs():
    with pytest.raises(ValueError, match="processes must be a whole number"):
        sample_sharded("gmm16", 4, processes=0)
    with pytest.raises(ValueError, match=r"processes=5 exceeds the n=4 samples"):
        sample_sharded("gmm16", 4, processes=5)
    with pytest.raises(ValueError, match=r"processes=3 exceeds the 2 batches of batch_size=2"):
        sample_sharded("gmm16", 4, processes=3, batch_size=2)
    with pytest.raises(ValueError, match="index_offset= is not supported"):
        sample_sharded("gmm16", 4, processes=2, index_offset=1)
    with pytest.raises(ValueError, match="rank must be a whole number in"):
        sample_shard("gmm16", 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="index_offset must be a whole number"):
        dpmlab.sample("gmm16", 2, index_offset=-1)
    with pytest.raises(ValueError, match="x_T must be a tensor with n=4 rows"):
        sample_shard("gmm16", 4, rank=0, world_size=2, x_T=torch.zeros(3, 2))
    m = dpmlab.load("gmm16")
    with pytest.raises(ValueError, match="must be picklable to reach the worker processes"):
        sample_sharded(lambda x, t: m(x, t), 4, processes=2, schedule=m.schedule, shape=(16,))
    with pytest.raises(ValueError, match=r"out must end in \.safetensors"):
        sample_distributed("gmm16", 2, out="x.pt")


def test_cli_processes_gives_the_single_process_samples(tmp_path):
    """``dpmlab sample --processes 2`` writes the same raw samples as one process (issue 17, item 4)."""
    import numpy as np

    from dpmlab.cli import main

    raws = []
    for k in (1, 2):
        raw = tmp_path / f"p{k}.npz"
        args = ["sample", "--model", "gmm16", "-n", "7", "--nfe", "4", "--solver", "ddpm", "--processes", str(k)]
        assert main([*args, "--out", str(tmp_path / f"p{k}.png"), "--raw", str(raw), "-q"]) == 0
        raws.append(np.load(raw)["samples"])
    assert np.array_equal(raws[0], raws[1])

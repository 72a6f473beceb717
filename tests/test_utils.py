import os

import pytest
import torch

from dpmlab._utils import _splitmix64, atomic_write, counter_normal, interp1d

M = (1 << 64) - 1


def _ref_splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def test_splitmix_matches_unsigned_reference():
    xs = [0, 1, 2, 123456789012345, (1 << 63) + 7, M]
    signed = [x - (1 << 64) if x >= 1 << 63 else x for x in xs]
    out = _splitmix64(torch.tensor(signed, dtype=torch.int64)).tolist()
    assert [o & M for o in out] == [_ref_splitmix(x) for x in xs]


def test_counter_normal_is_per_sample_and_gaussian():
    a = counter_normal(7, torch.arange(64), 3, (5,))
    b = counter_normal(7, torch.tensor([10, 3]), 3, (5,))
    assert torch.equal(a[[10, 3]], b)
    assert not torch.equal(counter_normal(7, torch.arange(4), 4, (5,)), a[:4])
    z = counter_normal(0, torch.arange(2000), 0, (100,), dtype=torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.05  # Gaussian kurtosis


def test_interp1d_exact_on_knots_and_extrapolates():
    xp = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    fp = torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64)
    assert interp1d(xp, xp, fp).tolist() == fp.tolist()
    assert interp1d(torch.tensor([2.0, -1.0, 5.0], dtype=torch.float64), xp, fp).tolist() == [2.5, -2.0, 4.0]


def test_atomic_write_never_leaves_partial_files(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_folder_replaces_or_leaves_the_old_folder(tmp_path):
    from dpmlab._utils import atomic_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half.json").write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(target) == ["old.json"] and os.listdir(tmp_path) == ["model"]
    with atomic_folder(target) as tmp:
        (tmp / "new.json").write_text("new")
    assert os.listdir(target) == ["new.json"] and os.listdir(tmp_path) == ["model"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # normal permissions, not mkdtemp's

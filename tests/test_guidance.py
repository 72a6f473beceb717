"""Dynamic thresholding (Imagen; DPM-Solver++) as a denoiser wrapper."""

import math

import pytest
import torch

import dpmlab
from dpmlab.models.analytic import preset
from dpmlab.models.guidance import dynamic_threshold
from dpmlab.schedules import LinearVP

torch.set_num_threads(1)


class Fixed:
    """A 'model' returning a fixed x0 (B, C, H, W), with the attributes a wrapper must forward."""

    schedule = LinearVP()
    data_shape = (2, 4, 4)

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x, t, **cond):
        return self.x0


def _x0(scale, seed=0):
    return scale * torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_identity_when_x0_is_inside_the_range():
    x0 = _x0(1.0).clamp(-0.9, 0.9)
    out = dynamic_threshold(Fixed(x0))(x0, torch.zeros(6))
    assert torch.equal(out, x0)
    x2 = 1.9 * x0  # data in [-2, 2] with max_value=2
    assert torch.allclose(dynamic_threshold(Fixed(x2), max_value=2.0)(x2, torch.zeros(6)), x2, atol=1e-15, rtol=0)


def test_clamps_to_the_per_sample_percentile():
    x0 = _x0(3.0)
    x0[0] *= 0.2  # a sample whose percentile stays below 1: plain clipping to [-1, 1]
    out = dynamic_threshold(Fixed(x0), ratio=0.9)(x0, torch.zeros(6))
    s = torch.quantile(x0.abs().reshape(6, -1), 0.9, dim=1).clamp(min=1.0)[:, None, None, None]
    assert torch.allclose(out, torch.clamp(x0, -s, s) / s)  # Imagen / DPM-Solver reference formula
    assert bool((out.abs() <= 1.0 + 1e-12).all())
    assert bool((out.abs().reshape(6, -1).max(1).values[1:] == 1.0).all())  # saturated samples reach 1
    capped = dynamic_threshold(Fixed(x0), ratio=0.9, s_max=1.5)(x0, torch.zeros(6))  # diffusers' cap
    s2 = s.clamp(max=1.5)
    assert torch.allclose(capped, torch.clamp(x0, -s2, s2) / s2)


def test_half_precision_and_forwarded_attributes():
    x0 = _x0(3.0).half()
    wrapped = dynamic_threshold(Fixed(x0))
    out = wrapped(x0, torch.zeros(6))
    assert out.dtype == torch.float16 and bool((out.abs() <= 1.0).all())
    assert wrapped.schedule is Fixed.schedule and wrapped.data_shape == (2, 4, 4)


def test_sampling_to_zero_stays_in_range():
    model = dynamic_threshold(preset("gmm2d").denoiser(LinearVP()))  # ring of modes at radius 1.5
    x = dpmlab.sample(model, 64, solver="dpm_solver_pp", nfe=10, to_zero=True, dtype=torch.float64)
    assert bool((x.abs() <= 1.0 + 1e-12).all())
    assert float(x.abs().max()) > 0.9


def test_validation():
    for kw, match in (
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\], got 0.0"),
        ({"ratio": 1.5}, "got 1.5"),
        ({"max_value": 0.0}, "need 0 < max_value <= s_max, got max_value=0.0"),
        ({"max_value": 2.0, "s_max": 1.0}, "got max_value=2.0, s_max=1.0"),
        ({"max_value": math.inf}, "got max_value=inf"),
    ):
        with pytest.raises(ValueError, match=match):
            dynamic_threshold(Fixed(_x0(1.0)), **kw)

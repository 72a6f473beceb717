import pytest
import torch

from dpmlab import timesteps as T
from dpmlab.schedules import EDM, VE, DiscreteVP, LinearVP

CONT = ["uniform_time", "uniform_lambda", "quadratic_time", "karras"]


@pytest.mark.parametrize("name", CONT)
@pytest.mark.parametrize("sch", [LinearVP(), EDM(), DiscreteVP.from_preset("linear")], ids=["linvp", "edm", "disc"])
def test_continuous_grids(name, sch):
    ts = T.GRIDS[name](sch, 7)
    assert ts.dtype == torch.float64 and ts.shape == (8,)
    assert float(ts[0]) == sch.t_max and float(ts[-1]) == sch.t_min
    assert bool((ts[1:] < ts[:-1]).all())


def test_grid_shapes_are_what_they_claim():
    sch = LinearVP()
    lam = sch.lam(T.uniform_lambda(sch, 10))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(10), atol=1e-10)
    q = T.quadratic_time(sch, 10).sqrt()
    assert torch.allclose(q[1:] - q[:-1], (q[1] - q[0]).expand(10), atol=1e-12)
    edm = EDM()
    k = T.karras(edm, 18)  # EDM's sigmas are exactly the times
    i = torch.arange(19, dtype=torch.float64)
    expect = (80 ** (1 / 7) + i / 18 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(k, expect, rtol=1e-12)
    kz = T.karras(edm, 18, to_zero=True)
    assert float(kz[-1]) == 0.0 and kz.shape == (19,)


def test_discrete_spacings_match_diffusers_formulas():
    sch = DiscreteVP.from_preset("linear")
    lead = T.leading(sch, 10, steps_offset=1)
    assert sch.t_to_index(lead[:-1]).round().tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    trail = T.trailing(sch, 10)
    assert sch.t_to_index(trail[:-1]).round().tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    lin = T.linspace(sch, 4)
    assert sch.t_to_index(lin[:-1]).round().tolist() == [999, 666, 333, 0]
    assert float(trail[-1]) == 0.0  # ends at sigma = 0 like diffusers' final_sigmas_type="zero"


def test_from_list_and_errors():
    sch = LinearVP()
    assert T.from_list(sch, [1.0, 0.5, 0.1]).tolist() == [1.0, 0.5, 0.1]
    with pytest.raises(ValueError, match="strictly decreasing"):
        T.from_list(sch, [1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="outside"):
        T.from_list(sch, [2.0, 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        T.from_list(sch, [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        T.from_list(sch, [1.0, float("nan")])
    with pytest.raises(ValueError, match="positive int"):
        T.uniform_time(sch, 0)
    with pytest.raises(ValueError, match="t_start > t_end"):
        T.uniform_time(sch, 4, t_start=0.1, t_end=0.5)
    with pytest.raises(ValueError, match="needs a DiscreteVP"):
        T.trailing(sch, 4)
    with pytest.raises(ValueError, match="never reaches sigma = 0"):
        T.karras(VE(), 4, to_zero=True)
    with pytest.raises(ValueError, match="unknown grid"):
        T.get_grid("cosine")

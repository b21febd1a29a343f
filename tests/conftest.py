import pytest
import torch

import fewstep

ALL_SCHEDULES = {
    "discrete-linear": lambda: fewstep.DiscreteVP.linear(),
    "discrete-scaled": lambda: fewstep.DiscreteVP.scaled_linear(),
    "discrete-cosine": lambda: fewstep.DiscreteVP.cosine(),
    "linear-vp": lambda: fewstep.LinearVP(),
    "cosine-vp": lambda: fewstep.CosineVP(),
    "edm": lambda: fewstep.EDM(),
    "flow": lambda: fewstep.FlowMatching(),
}


@pytest.fixture(params=sorted(ALL_SCHEDULES))
def any_schedule(request):
    return ALL_SCHEDULES[request.param]()


@pytest.fixture(scope="session")
def small_gmm():
    return fewstep.GaussianMixture.random(8, 4, 2, seed=3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)

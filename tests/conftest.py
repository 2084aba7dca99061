import pytest
import torch

from blockskip.models import Flux, Sana

torch.set_num_threads(2)


@pytest.fixture(params=[Flux, Sana], ids=["flux", "sana"])
def family(request):
    """A tiny model of each family, seeded, fp32 on CPU."""
    return request.param.tiny(seed=0)


@pytest.fixture
def flux():
    return Flux.tiny(seed=0)


@pytest.fixture
def sana():
    return Sana.tiny(seed=0)

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` from every test folder

from blockskip.models import Flux, Sana  # noqa: E402

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

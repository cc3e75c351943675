import os
import random

import pytest
import torch

import linquant  # noqa: F401  (loads the op library)


@pytest.fixture
def gen(request):
    """A generator with a fresh seed each run; the seed is printed when the test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

"""Settings shared by the package's doctests and the tests (pytest reads this before collecting either).

``TRITON_INTERPRET`` must be set before anything imports Triton, so the
fused-kernel code runs Triton's interpreter on CPU tensors. Every test and
every doctest starts from ``torch.manual_seed(0)``. Modules that import an
optional dependency at import time are not collected for doctests when it is
absent.
"""

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Package modules that import an optional dependency at import time.
_OPTIONAL = {
    "robustcompress/kernels/_triton_power.py": "triton",
    "robustcompress/integrations/hf.py": "transformers",
    "robustcompress/integrations/lightning.py": "lightning",
}

collect_ignore = [path for path, dep in _OPTIONAL.items() if importlib.util.find_spec(dep) is None]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


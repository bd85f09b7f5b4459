"""Kernel tests: on CUDA when present, else on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before ``kvtuner.ops`` (and so ``triton.jit``) is imported,
which is why it is done here, at conftest import time.
"""

import os
import sys
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing
    torch = None
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

# Same name and meaning as in tests/conftest.py: once this file is imported it is
# sys.modules["conftest"], and top-level tests do `from conftest import DEVICE`.
DEVICE = "cuda" if _HAS_CUDA else "cpu"

_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if str(_KERNELS) not in sys.path:
    sys.path.insert(0, str(_KERNELS))
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))  # kvt_helpers

if torch is None:
    collect_ignore_glob = ["test_*.py"]
else:
    try:
        import triton  # noqa: F401
    except Exception:
        collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where none is present)")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE

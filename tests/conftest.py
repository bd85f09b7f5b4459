import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PRESETS = SHARED / "kvtuner-presets"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# Without a GPU, Triton kernels (ours and SGLang's) run in the interpreter on CPU tensors.
# Must be set before any kernel module is imported (triton.jit reads it at decoration).
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if _has_cuda() else "cpu"


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def presets() -> Path:
    if not PRESETS.is_dir():
        pytest.skip("../shared/kvtuner-presets is absent")
    return PRESETS


@pytest.fixture(scope="session")
def quilt():
    if shutil.which("quilt") is None:
        pytest.skip("quilt is not installed")
    return "quilt"

"""Suite-wide settings: offline hubs, W&B off, the prebuilt DeepSpeed op, GPU test skipping, and the
module-scoped local Ray most heavy modules share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))


try:  # property tests draw the same examples on every run and machine: a fresh clone is green or red, never by luck
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("finemem", derandomize=True, database=None)
    _hypothesis_settings.load_profile("finemem")
except ImportError:  # the dev extra is not installed: the property tests are not collected either
    pass


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except (ImportError, RuntimeError, OSError):
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for one module: started here unless one is already up (and then left to its
    owner), shut down at the module's end. Tests that start a Trainer call `ray.shutdown()` first:
    the trainer starts a Ray sized for its own roles."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()

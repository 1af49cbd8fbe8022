import pytest
import torch

import minipeft as mp


@pytest.fixture
def tiny_config():
    # small for testing efficiency
    return mp.GPTConfig(d_model=32, n_layer=2, n_head=4, d_ff=64, block_size=48)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return mp.GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def _base_state():
    return {k: v.clone() for k, v in mp.load_base().state_dict().items()}


@pytest.fixture
def base():
    """A fresh copy of the shipped base model."""
    return mp.load_base()

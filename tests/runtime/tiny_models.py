"""Small model factories for tests that compile in subprocesses (``tiny_models:mlp``)."""
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    return m, (torch.randn(3, 16),)

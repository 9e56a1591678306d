"""SCAFFOLD (being written by the adapter work)."""
from torch import nn


class BoundedGainLinear(nn.Module):
    pass


def attach_adapters(model, moments, r, metric="identity", **kwargs):
    raise NotImplementedError


def detach_adapters(model):
    raise NotImplementedError


def save_adapters(path, model):
    raise NotImplementedError


def load_adapters(path, model):
    raise NotImplementedError

"""SCAFFOLD (being written by the orientation work)."""
from typing import NamedTuple

import torch


class Oriented(NamedTuple):
    U: torch.Tensor
    S: torch.Tensor
    P: torch.Tensor
    W_res: torch.Tensor
    info: dict


def orient(W, C, r, metric="full", **kwargs):
    raise NotImplementedError

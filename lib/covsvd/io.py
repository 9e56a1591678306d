"""SCAFFOLD (being written by the capture work): safetensors save/load of moments."""


def save_moments(path, moments, model=None):
    raise NotImplementedError


def load_moments(path, model=None):
    raise NotImplementedError

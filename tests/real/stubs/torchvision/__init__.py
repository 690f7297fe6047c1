"""A stand-in for torchvision, on ComfyUI's PYTHONPATH in `make test-real`.

PyPI's only torchvision for torch 2.13 is a CUDA build whose operators do not
load beside the CPU torch (``operator torchvision::nms does not exist``), and
ComfyUI imports torchvision at start-up for a few model families (Stable
Cascade, Cosmos, ACE) the weightless test workflow never touches. Anything
used from here raises.
"""

__version__ = "0.0.0+stub"


def __getattr__(name):
    raise ImportError(f"torchvision.{name}: torchvision is a stub in make test-real")

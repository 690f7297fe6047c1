"""See torchvision/__init__.py: a stub."""


def __getattr__(name):
    raise ImportError(f"torchvision.transforms.{name}: torchvision is a stub in make test-real")

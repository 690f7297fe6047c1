"""mgpumanager: one HTTP door to several local GPU services.

The core (``gpulock``, ``policy``, ``config``, ``gpu``, ``consumers``,
``broker``) is plain Python; only ``web`` and ``app`` import Flask.
"""

__version__ = "0.1.0"

"""Simulated consumers and GPU, for the tests and ``mgpumanager demo``."""

from .consumers import (ComfySim, GpuServer, MvoiceSim, OllamaSim, SimCluster, SimGpu,
                        SimOom, WhisperSim, start_cluster)

__all__ = ["ComfySim", "GpuServer", "MvoiceSim", "OllamaSim", "SimCluster", "SimGpu",
           "SimOom", "WhisperSim", "start_cluster"]

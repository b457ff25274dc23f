"""Typed, frozen descriptions of what qsengine simulates: models, numeric
precisions, accelerators, clusters, parallel plans and workloads."""

from qsengine.specs.hardware import Accelerator, Cluster
from qsengine.specs.model import Attention, Model
from qsengine.specs.plan import Plan, Workload
from qsengine.specs.precision import PRESETS as PRECISIONS
from qsengine.specs.precision import Precision

__all__ = ["Accelerator", "Attention", "Cluster", "Model", "Plan", "PRECISIONS", "Precision", "Workload"]

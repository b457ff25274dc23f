"""Typed, frozen descriptions of what qsengine simulates: models, numeric
precisions, accelerators, clusters, parallel plans and workloads; the shipped
presets and their loaders; the quality-matched dense twin and the qs
inequality."""

from qsengine.specs.hardware import Accelerator, Cluster
from qsengine.specs.loaders import (
    accelerators,
    as_accelerator,
    as_cluster,
    as_model,
    clusters,
    default_precision,
    load_accelerator,
    load_cluster,
    load_model,
    models,
    precisions,
)
from qsengine.specs.model import Attention, Model
from qsengine.specs.plan import Plan, Workload
from qsengine.specs.precision import PRESETS as PRECISIONS
from qsengine.specs.precision import Precision, as_precision
from qsengine.specs.twin import TWIN_SHAPES, QsResult, TwinSpec, Verdict, dense_twin, qs

__all__ = [
    "Accelerator",
    "Attention",
    "Cluster",
    "Model",
    "Plan",
    "PRECISIONS",
    "Precision",
    "QsResult",
    "Verdict",
    "Workload",
    "accelerators",
    "as_accelerator",
    "as_cluster",
    "as_model",
    "as_precision",
    "clusters",
    "default_precision",
    "dense_twin",
    "TwinSpec",
    "TWIN_SHAPES",
    "load_accelerator",
    "load_cluster",
    "load_model",
    "models",
    "precisions",
    "qs",
]

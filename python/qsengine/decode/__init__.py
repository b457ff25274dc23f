"""The decode model and the comparison: one pipeline from a point to its answer.

Modules, one role each:

* :mod:`~qsengine.decode.point`: the point's fields, defaults and validation;
* :mod:`~qsengine.decode.step`: the step model (roofline pieces, communication),
  vectorised over lanes, and its parts: :mod:`~qsengine.decode.params` (options
  and lane parameters), :mod:`~qsengine.decode.kernels` (calibrated kernels,
  roofline, collectives), :mod:`~qsengine.decode.straggler` (the closed-form
  straggler), :mod:`~qsengine.decode.breakdown` (the typed step results);
* :mod:`~qsengine.decode.sides`, :mod:`~qsengine.decode.montecarlo`,
  :mod:`~qsengine.decode.why`, :mod:`~qsengine.decode.frontier`: the pipeline's
  stages (one side over lanes x plans, the Monte Carlo at the chosen point, the
  why factors, the latency-throughput frontier);
* :mod:`~qsengine.decode.pipeline`: the evaluation pipeline over arrays of
  points (admission, best batch and plan, Monte Carlo refinement, comparison,
  break-even q*);
* :mod:`~qsengine.decode.result`: the typed results;
* :mod:`~qsengine.decode.simulate`: :func:`simulate`, the pipeline at n = 1.
"""

from qsengine.decode.point import ContextWarning, Point
from qsengine.decode.result import SideResult, SimulationResult
from qsengine.decode.simulate import simulate
from qsengine.decode.breakdown import StepBreakdown
from qsengine.decode.params import StepOptions
from qsengine.decode.step import decode_step

__all__ = ["ContextWarning", "Point", "SideResult", "SimulationResult", "StepBreakdown", "StepOptions",
           "decode_step", "simulate"]

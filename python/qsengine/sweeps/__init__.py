"""qsengine.sweep: :func:`qsengine.simulate` over a grid of points, on one
machine or a Dask cluster, checkpointed so that nothing completed is lost.

How a sweep runs (see ARCHITECTURE.md, "Sweeps"):

1. **Validate** the whole grid before any work: unknown fields (with a
   did-you-mean), empty lists, values of the wrong type, and every point's
   specs (names resolved with the loaders, dense twin built, plan checked).
2. **Identify** each point by its content: ``point_id`` is a SHA-256 of the
   canonical JSON of its inputs (names resolved to the full spec content,
   defaults filled in). Its seed is
   ``SeedSequence(entropy=sweep_seed.entropy, spawn_key=sweep_seed.spawn_key +
   words(point_id))``: never its position, chunk or worker, so a point's result
   is identical whichever executor or chunking ran it. Identical points in a
   grid are computed once.
3. **Chunk** the points not yet done (grid order); closed-form points
   (``microbatches=0``) go in large chunks, Monte Carlo points in small ones.
4. **Run** the chunks in-process, in a process pool, on any
   ``concurrent.futures.Executor`` or on Dask; results are taken as they
   complete, each chunk is written to the checkpoint atomically, a chunk whose
   worker died is resubmitted (up to ``retries`` times).
5. **Assemble** one row per grid point in grid order: ``point_id``, the inputs
   as ``in_<field>`` columns, and every field of
   :meth:`qsengine.SimulationResult.to_record`.

Dask is imported only when a Dask executor is used.
"""

from qsengine.sweeps.grid import FIELDS, point_id, point_seed
from qsengine.sweeps.run import load_results, sweep

__all__ = ["sweep", "load_results", "FIELDS", "point_id", "point_seed"]

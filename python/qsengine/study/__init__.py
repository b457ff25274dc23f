"""The built-in study (``qsengine study``): the README's main job.

DeepSeek-V3, Qwen3-235B-A22B, Grok-1 and Switch-C against their quality-matched
dense twins on common 8-GPU servers and larger clusters, over context lengths
from 4K to 128K tokens, each model at its deployed precision.

The study is a :func:`qsengine.sweep` over model × cluster × context: the whole
grid is validated before any work, completed points are checkpointed under
``OUT/checkpoint/<key>/`` (``key`` hashes the grid and seed), a re-run resumes
exactly (a checkpoint written by other code is refused: ``--no-resume`` /
``resume=False`` starts over), and it runs in-process or on Dask. It writes,
in ``OUT``:

* ``summary.md``: the run settings, then one verdict line per model × cluster
  (answer first), then the table;
* ``results.{csv,parquet}``: one row per point, with the run settings as
  columns (and in the parquet schema metadata, key ``qsengine.study``),
  among them ``qsengine_version`` and ``qsengine_code``, the
  :func:`qsengine.code_fingerprint` of the code that computed them;
* ``ratio_vs_context.png``: dense/MoE throughput ratio vs context, one panel
  per model, one line per cluster; infeasible points marked below the data;
* ``hbm_per_gpu.png``: HBM use per GPU of the MoE and of its twin;
* ``fragmentation.png``: unique experts touched and straggler load vs batch
  for each studied model's routing.
* ``frontier.png``: each model's MoE and twin latency-throughput frontiers
  at one example point, the dense/MoE ratio at 20 and 50 ms/token marked;
* ``why.png``: per model, the why factors (headroom, weights, attention,
  communication, other; they multiply to the ratio) against context.
"""

from qsengine.study.cli import add_parser
from qsengine.study.config import (
    DEFAULT_CLUSTERS,
    DEFAULT_CONTEXTS,
    DEFAULT_MODELS,
    DEFAULT_SEED,
    DEFAULT_TIE,
    StudyConfig,
    checkpoint_dir,
    cluster_display,
    format_tokens,
    parse_tokens,
)
from qsengine.study.run import run_study, tie_aware_verdict
from qsengine.study.text import fmt_num, format_summary, format_table, verdict_lines

__all__ = ["StudyConfig", "run_study", "format_table", "format_summary", "parse_tokens", "format_tokens",
           "cluster_display", "checkpoint_dir", "tie_aware_verdict", "verdict_lines", "fmt_num", "add_parser",
           "DEFAULT_MODELS", "DEFAULT_CLUSTERS", "DEFAULT_CONTEXTS", "DEFAULT_SEED", "DEFAULT_TIE"]

"""``qsengine pack`` and ``qsengine min-gpus``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal


from qsengine.specs import Cluster, Plan
from qsengine.specs import PRECISIONS
from qsengine.specs.loaders import as_cluster, as_model

if TYPE_CHECKING:  # pragma: no cover
    pass

from qsengine.packing.api import _precision, min_gpus, pack, rank_plans
from qsengine.packing.memory import _as_accelerator


# --------------------------------------------------------------------- CLI
def _parse_plan(text: str) -> Plan | Literal["auto"]:
    """``--plan``: ``auto`` or a plan label (:meth:`Plan.from_label`)."""
    return "auto" if text == "auto" else Plan.from_label(text)


def _cmd_pack(args: Any) -> int:
    cluster = as_cluster(args.cluster)
    plan = _parse_plan(args.plan)
    from qsengine.study import parse_tokens

    p = pack(args.model, cluster, parse_tokens(args.context), plan=plan, precision=args.precision,
             replicas=args.replicas)
    if args.json:
        print(p.to_json(indent=2))
    else:
        print(p.summary())
        if plan == "auto":
            print("  plan 'auto' here = the largest admissible cluster batch (qsengine simulate's 'auto' picks "
                  "the highest throughput, which can be another plan)")
    return 0 if p.feasible else 1


def _cmd_min_gpus(args: Any) -> int:
    from qsengine.study import parse_tokens

    model = as_model(args.model)
    acc = _as_accelerator(args.accelerator)
    prec = _precision(model, args.precision)
    context = parse_tokens(args.context)
    g = min_gpus(model, acc, context, precision=prec, max_gpus=args.max_gpus)
    head = f"{model.id} on {acc.id} at {prec.name}, context {context:,} tokens"
    if g is None:
        print(f"{head}: no cluster of up to {args.max_gpus:,} GPUs fits one sequence")
        return 1
    best = rank_plans(model, Cluster(acc, g), context, precision=prec).iloc[0]
    print(f"{head}: {g} GPUs (plan {best['plan']}, {int(best['cluster_batch']):,} sequences at most; "
          f"plan = the largest admissible cluster batch)")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``qsengine pack``."""
    ps = sub.add_parser("pack", help="pack a model onto a cluster's HBM: per-GPU map and admissible batch")
    ps.add_argument("--model", required=True, help="model: shipped name, TOML file or Hugging Face config.json")
    ps.add_argument("--cluster", required=True, help="cluster: shipped name, 'NxGPU' such as 8xH200, or TOML file")
    ps.add_argument("--context", required=True, help="context length: 32768 or 32K")
    ps.add_argument("--precision", default=None,
                    help=f"precision preset ({', '.join(sorted(PRECISIONS))}); default: the model's deployed precision")
    ps.add_argument("--plan", default="auto", help="'auto' or a label like tp8-pp1-dp1-ep8")
    ps.add_argument("--replicas", type=int, default=0, help="extra expert replicas per EP group")
    ps.add_argument("--json", action="store_true", help="print the full record as JSON")
    ps.set_defaults(handler=_cmd_pack)

    mg = sub.add_parser("min-gpus", help="smallest number of GPUs of one accelerator that fits a model",
                        description="The smallest cluster of ACCELERATOR GPUs on which one sequence of CONTEXT "
                                    "tokens fits under some valid plan (weights + KV in usable HBM).")
    mg.add_argument("--model", required=True, help="model: shipped name, TOML file or Hugging Face config.json")
    mg.add_argument("--accelerator", required=True, help="accelerator: shipped name or alias (H200, MI300X), or TOML")
    mg.add_argument("--context", required=True, help="context length: 32768 or 32K")
    mg.add_argument("--precision", default=None,
                    help=f"precision preset ({', '.join(sorted(PRECISIONS))}); default: the model's deployed precision")
    mg.add_argument("--max-gpus", type=int, default=4096, help="largest cluster tried (default %(default)s)")
    mg.set_defaults(handler=_cmd_min_gpus)

"""Routing study: fragmentation (unique experts, reuse, straggler load) vs batch size.

Also registers the ``qsengine route`` and ``qsengine routing-study`` CLI
sub-commands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from qsengine._seed import SeedLike, as_seed_sequence
from qsengine.routing import GroupLimited, Placement, PowerLaw, RoutingModel, Uniform, expected_unique, route

__all__ = ["fragmentation_curve", "plot_fragmentation", "DEEPSEEK_V3_ROUTING", "add_parser"]

#: DeepSeek-V3-like routing: 8 groups of 32 experts, 4 groups per token, power-law skew 1.01.
DEEPSEEK_V3_ROUTING = GroupLimited(8, 4, PowerLaw(1.01))
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def fragmentation_curve(experts: int, top_k: int, gpus: int, batches: Sequence[int],
                        routing: RoutingModel | str = "uniform", microbatches: int = 2000,
                        seed: SeedLike = None, threads: int | None = None) -> pd.DataFrame:
    """Unique experts, reuse and straggler u_g / n_g vs batch size.

    One row per batch size; ``uniform_unique`` is the closed form
    E(1-(1-k/E)^B) for uniform routing, shown beside the simulated mean. Each
    batch size uses its own child of the seed's SeedSequence.
    """
    seq = as_seed_sequence(seed)
    children = seq.spawn(len(batches))
    rows: list[dict[str, Any]] = []
    for B, child in zip(batches, children):
        s = route(experts, top_k, int(B), microbatches, routing=routing, placement=Placement.contiguous(gpus),
                  seed=child, threads=threads)
        u, ug, ng = s.unique, s.gpu_unique_max, s.gpu_assign_max
        rows.append({
            "batch": int(B),
            "unique_mean": u.mean, "unique_p50": u.p50, "unique_p99": u.p99,
            "uniform_unique": expected_unique(experts, top_k, int(B)),
            "reuse_mean": s.reuse.mean,
            "gpu_unique_max_mean": ug.mean, "gpu_unique_max_p99": ug.p99,
            "gpu_assign_max_mean": ng.mean, "gpu_assign_max_p99": ng.p99,
            "imbalance_mean": s.imbalance.mean,
        })
    df = pd.DataFrame(rows)
    df.attrs.update(experts=experts, top_k=top_k, gpus=gpus, microbatches=microbatches,
                    routing=str(routing) if isinstance(routing, str) else routing.to_dict())
    return df


def plot_fragmentation(df: pd.DataFrame, ax: Any = None, label: str | None = None) -> Any:
    """Plot unique experts (and the uniform closed form) and straggler u_g vs batch (log x)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4.5))
    name = label or str(df.attrs.get("routing", ""))
    ax.plot(df["batch"], df["unique_mean"], marker="o", label=f"unique experts u ({name})")
    ax.plot(df["batch"], df["gpu_unique_max_mean"], marker="s", linestyle="--", label=f"straggler u_g ({name})")
    ax.plot(df["batch"], df["uniform_unique"], color="grey", linestyle=":", label="uniform closed form E[u]")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(list(df["batch"]), [f"{int(b):,}" for b in df["batch"]])  # plain numbers, not 2^k
    ax.set_xlabel("batch (tokens per microbatch)")
    ax.set_ylabel("experts touched per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _cmd_route(args: argparse.Namespace) -> int:
    placement = Placement.round_robin(args.gpus) if args.round_robin else Placement.contiguous(args.gpus)
    s = route(args.experts, args.top_k, args.batch, args.microbatches, routing=args.routing, placement=placement,
              seed=args.seed, threads=args.threads, layers=args.layers)
    print(s.summary())
    print(f"seed entropy: {s.seed[0]['entropy']}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.out
    os.makedirs(out, exist_ok=True)
    seq = as_seed_sequence(args.seed)
    a, b = seq.spawn(2)
    frames = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, model, child in (("deepseek_v3", DEEPSEEK_V3_ROUTING, a), ("uniform", Uniform(), b)):
        df = fragmentation_curve(256, 8, 8, DEFAULT_BATCHES, routing=model, microbatches=args.microbatches,
                                 seed=child, threads=args.threads)
        df.insert(0, "routing", name)
        frames.append(df)
        plot_fragmentation(df, ax=ax, label=name)
    table = pd.concat(frames, ignore_index=True)
    ax.set_title("E=256, k=8, 8 GPUs: DeepSeek-V3-like GroupLimited(8,4,PowerLaw(1.01)) vs uniform")
    csv = os.path.join(out, "routing_study.csv")
    png = os.path.join(out, "routing_study.png")
    table.to_csv(csv, index=False)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["routing", "batch", "unique_mean", "uniform_unique", "reuse_mean", "gpu_unique_max_mean",
                     "gpu_assign_max_mean", "imbalance_mean"]].to_string(index=False, float_format="%.3f"))
    print(f"seed entropy: {seq.entropy}\nwrote {csv}\nwrote {png}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``route`` and ``routing-study`` with the CLI."""
    p = sub.add_parser("route", help="simulate token-to-expert routing and print statistics")
    p.add_argument("--experts", type=int, default=256, help="routed experts E (default %(default)s)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token k (default %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="tokens per microbatch (default %(default)s)")
    p.add_argument("--microbatches", type=int, default=100000,
                   help="microbatches simulated (default %(default)s)")
    p.add_argument("--layers", type=int, default=1, help="MoE layers each microbatch passes (default %(default)s)")
    p.add_argument("--routing", default="uniform",
                   help="uniform | powerlaw:A[:per_layer] | dirichlet:C | group:G:T[:BASE] | sticky:RHO[:BASE] | trace:PATH")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the experts are placed on (default %(default)s)")
    p.add_argument("--round-robin", action="store_true", help="round-robin placement (default contiguous)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: fresh entropy, printed)")
    p.add_argument("--threads", type=int, default=None, help="C++ threads (default: all cores)")
    p.set_defaults(handler=_cmd_route)

    q = sub.add_parser("routing-study", help="DeepSeek-V3-like vs uniform routing over batch sizes 1..1024")
    q.add_argument("--out", default="qsengine-out", help="directory for routing_study.csv and .png")
    q.add_argument("--microbatches", type=int, default=2000, help="microbatches per batch size (default %(default)s)")
    q.add_argument("--seed", type=int, default=2026, help="seed (default %(default)s)")
    q.add_argument("--threads", type=int, default=None, help="C++ threads (default: all cores)")
    q.set_defaults(handler=_cmd_study)

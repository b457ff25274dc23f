"""Accelerators and clusters.

Units inside the objects are SI base units: bytes, bytes/s, FLOP/s. The TOML
files use the reference data's units (GB, TB/s, TFLOP/s, GB/s, Gbit/s) and the
loaders convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qsengine.specs._validate import (
    check_float,
    check_fraction,
    check_int,
    check_str,
    current_source,
    did_you_mean,
    fail,
    type_fail,
)

#: dtype keys an accelerator's ``flops`` table may use.
FLOPS_DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "fp4", "nvfp4")
#: Values of :attr:`Accelerator.scaleup_topology`: ``"switch"`` (every GPU of
#: the domain reaches every other at its full scale-up bandwidth: NVSwitch, a
#: fully connected Infinity Fabric) or ``"torus"`` (TPU ICI: a k-ary D-cube,
#: links to nearest neighbours only; docs/model.md "Torus all-to-all").
SCALEUP_TOPOLOGIES = ("switch", "torus")


@dataclass(frozen=True)
class Accelerator:
    """One GPU/accelerator.

    Attributes:
        id, name, source: identity and the URL the numbers come from.
        hbm_bytes: HBM capacity.
        hbm_bandwidth: peak HBM bandwidth, bytes/s.
        flops: dense (non-sparse) peak FLOP/s per compute dtype, e.g.
            ``{"bf16": 989e12, "fp8": 1979e12}``.
        bandwidth_efficiency: achievable fraction of ``hbm_bandwidth`` (η_bw).
        flops_efficiency: achievable fraction of peak FLOP/s (η_f) for any
            dtype without its own entry in ``flops_efficiency_by_dtype``.
        flops_efficiency_by_dtype: measured achievable fraction per compute
            dtype, e.g. ``{"fp8": 0.734}`` (fp8 MAMF / fp8 peak); read through
            :meth:`flops_efficiency_for`.
        scaleup_bandwidth: per-GPU unidirectional bandwidth inside the
            scale-up domain (NVLink / xGMI / ICI), bytes/s.
        internode_bandwidth: per-GPU network bandwidth across domains, bytes/s.
        link_efficiency: achievable fraction of link bandwidths.
        gpus_per_node: GPUs per server (tray).
        scaleup_domain: GPUs sharing the scale-up fabric (8 for HGX, 72 for NVL72).
        usable_hbm_fraction: fraction of HBM the serving engine may use.
        runtime_reserve_bytes: per-GPU reserve for the runtime, CUDA graphs,
            activations and workspace, taken out of the usable HBM.
        kv_fraction: fraction of the memory left after weights (usable HBM
            minus weights and expert replicas) that the serving engine gives
            the KV cache (TensorRT-LLM's ``free_gpu_memory_fraction``); 1 =
            all of it. Serving policies set it (:mod:`qsengine.specs.serving`).
        scaleup_topology: ``"switch"`` (default; a crossbar: NVSwitch,
            Infinity Fabric) or ``"torus"`` (TPU ICI); see
            :data:`SCALEUP_TOPOLOGIES`.
        torus_dims: dimensions D of the torus (3 for TPU v5p, 2 for v6e);
            required for a torus, None for a switch. ``scaleup_bandwidth`` is
            then spread over the chip's 2·D links.
        torus_wraparound: the smallest slice (chips) that has wraparound
            links; smaller slices are meshes (TPU v5p: 64, one 4x4x4 cube).
            None: every slice of the torus wraps around. Torus only.
    """

    id: str
    name: str
    hbm_bytes: float
    hbm_bandwidth: float
    flops: dict[str, float]
    scaleup_bandwidth: float
    internode_bandwidth: float
    gpus_per_node: int
    scaleup_domain: int
    bandwidth_efficiency: float = 0.8
    flops_efficiency: float = 0.7
    link_efficiency: float = 0.7
    flops_efficiency_by_dtype: dict[str, float] = field(default_factory=dict)
    usable_hbm_fraction: float = 0.9
    runtime_reserve_bytes: float = 4e9
    kv_fraction: float = 1.0
    vendor: str = ""
    source: str = ""
    notes: str = field(default="", compare=False)
    scaleup_topology: str = "switch"
    torus_dims: int | None = None
    torus_wraparound: int | None = None

    def __post_init__(self) -> None:
        src = current_source(f"Accelerator {self.id!r}" if isinstance(self.id, str) else "Accelerator")
        check_str(src, "id", self.id, nonempty=True)
        check_str(src, "name", self.name)
        for f in ("hbm_bytes", "hbm_bandwidth", "scaleup_bandwidth", "internode_bandwidth", "runtime_reserve_bytes"):
            check_float(src, f, getattr(self, f), allow_zero=(f == "runtime_reserve_bytes"))
        if not isinstance(self.flops, dict):
            raise type_fail(src, "flops", self.flops, "a table of dtype -> FLOP/s")
        if "bf16" not in self.flops:
            raise fail(src, "flops", self.flops, "must give a 'bf16' peak")
        for k, v in self.flops.items():
            if k not in FLOPS_DTYPES:
                raise fail(src, f"flops.{k}", v, f"unknown dtype; known: {list(FLOPS_DTYPES)}{did_you_mean(str(k), FLOPS_DTYPES)}")
            check_float(src, f"flops.{k}", v)
        if not isinstance(self.flops_efficiency_by_dtype, dict):
            raise type_fail(src, "flops_efficiency_by_dtype", self.flops_efficiency_by_dtype,
                            "a table of dtype -> fraction")
        for k, v in self.flops_efficiency_by_dtype.items():
            if k not in FLOPS_DTYPES:
                raise fail(src, f"flops_efficiency_by_dtype.{k}", v,
                           f"unknown dtype; known: {list(FLOPS_DTYPES)}{did_you_mean(str(k), FLOPS_DTYPES)}")
            check_fraction(src, f"flops_efficiency_by_dtype.{k}", v)
        for f in ("bandwidth_efficiency", "flops_efficiency", "link_efficiency", "usable_hbm_fraction", "kv_fraction"):
            check_fraction(src, f, getattr(self, f))
        check_int(src, "gpus_per_node", self.gpus_per_node, minimum=1)
        check_int(src, "scaleup_domain", self.scaleup_domain, minimum=1)
        check_str(src, "vendor", self.vendor)
        check_str(src, "source", self.source)
        self._check_topology(src)
        if self.usable_bytes <= 0:
            raise fail(src, "runtime_reserve_bytes", self.runtime_reserve_bytes,
                       f"leaves no usable HBM: hbm_bytes x usable_hbm_fraction ({self.hbm_bytes * self.usable_hbm_fraction:.4g}) "
                       "must exceed the reserve")

    def _check_topology(self, src: str) -> None:
        """``scaleup_topology`` is known; a torus has ``torus_dims`` >= 1 (and
        an optional ``torus_wraparound`` >= 1); a switch has neither."""
        check_str(src, "scaleup_topology", self.scaleup_topology)
        if self.scaleup_topology not in SCALEUP_TOPOLOGIES:
            raise fail(src, "scaleup_topology", self.scaleup_topology,
                       f"must be one of {list(SCALEUP_TOPOLOGIES)}"
                       f"{did_you_mean(self.scaleup_topology, SCALEUP_TOPOLOGIES)}")
        if self.scaleup_topology == "torus":
            if self.torus_dims is None:
                raise fail(src, "torus_dims", None, "a torus needs its number of dimensions (e.g. 3 for TPU v5p)")
            # at most 8: deployed tori have 2-6 dimensions (TPU ICI 2-3, Fujitsu Tofu 6), and the slice search
            # (kernels.torus_shape) recurses once per dimension
            check_int(src, "torus_dims", self.torus_dims, minimum=1, maximum=8)
            if self.torus_wraparound is not None:
                check_int(src, "torus_wraparound", self.torus_wraparound, minimum=1)
        else:
            for f in ("torus_dims", "torus_wraparound"):
                if getattr(self, f) is not None:
                    raise fail(src, f, getattr(self, f), "only for scaleup_topology = 'torus'")

    def __hash__(self) -> int:  # dict field: hash by identity-defining fields
        return hash((self.id, self.hbm_bytes, self.hbm_bandwidth, tuple(sorted(self.flops.items()))))

    def _lookup_order(self, dtype: str) -> tuple[str, ...]:
        # "fp4" and "nvfp4" name the same 4-bit tensor-core path on Blackwell
        # (NVFP4 is the block-scaled FP4 the tensor cores run; MXFP4 runs at the
        # same rate): both read an ``nvfp4`` entry first, then ``fp4``, so
        # GB300 and B300 (same silicon) cannot disagree through which key a
        # file happened to use.
        if dtype not in FLOPS_DTYPES:
            raise ValueError(f"dtype={dtype!r}: unknown compute dtype; known: {list(FLOPS_DTYPES)}")
        return {"fp4": ("nvfp4", "fp4", "fp8", "bf16"), "nvfp4": ("nvfp4", "fp4", "fp8", "bf16"),
                "fp8": ("fp8", "bf16"), "int8": ("int8", "fp8", "bf16")}.get(dtype, (dtype, "bf16"))

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; falls back to the best lower precision
        the accelerator supports (fp4/nvfp4 -> fp8 -> bf16)."""
        for d in self._lookup_order(dtype):
            if d in self.flops:
                return self.flops[d]
        raise ValueError(f"accelerator {self.id!r}: no peak FLOP/s for dtype {dtype!r} (has {sorted(self.flops)})")

    def peak_flops_dtype(self, dtype: str) -> str:
        """The ``flops`` key :meth:`peak_flops` reads for ``dtype`` (after fallback)."""
        for d in self._lookup_order(dtype):
            if d in self.flops:
                return d
        raise ValueError(f"accelerator {self.id!r}: no peak FLOP/s for dtype {dtype!r} (has {sorted(self.flops)})")

    def flops_efficiency_for(self, dtype: str) -> float:
        """Achievable fraction of :meth:`peak_flops` for ``dtype``: the measured
        per-dtype entry of the peak actually used (after fallback), else
        ``flops_efficiency``."""
        d = self.peak_flops_dtype(dtype)
        return self.flops_efficiency_by_dtype.get(d, self.flops_efficiency)

    def achievable_flops(self, dtype: str) -> float:
        """``peak_flops(dtype) x flops_efficiency_for(dtype)``, FLOP/s."""
        return self.peak_flops(dtype) * self.flops_efficiency_for(dtype)

    @property
    def usable_bytes(self) -> float:
        """HBM available to weights and KV: capacity·usable fraction − reserve."""
        return self.hbm_bytes * self.usable_hbm_fraction - self.runtime_reserve_bytes


#: Largest cluster a spec may describe (packing keeps per-GPU maps; 2^20 GPUs
#: is far above any deployed system and keeps those maps in the megabytes).
MAX_GPUS = 1 << 20


@dataclass(frozen=True)
class Cluster:
    """``num_gpus`` identical accelerators, e.g. ``Cluster(h200, 8)`` ("8xH200")."""

    accelerator: Accelerator
    num_gpus: int
    name: str = ""
    source: str = field(default="", compare=False)
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        src = current_source(f"Cluster {self.name!r}" if self.name else "Cluster")
        if not isinstance(self.accelerator, Accelerator):
            raise type_fail(src, "accelerator", self.accelerator, "an Accelerator")
        check_int(src, "num_gpus", self.num_gpus, minimum=1, maximum=MAX_GPUS)
        check_str(src, "name", self.name)

    @property
    def label(self) -> str:
        return self.name or f"{self.num_gpus}x{self.accelerator.id}"

    @property
    def total_hbm_bytes(self) -> float:
        """HBM capacity summed over all GPUs."""
        return self.num_gpus * self.accelerator.hbm_bytes

    @property
    def total_usable_bytes(self) -> float:
        """Usable HBM (after usable fraction and reserve) summed over all GPUs."""
        return self.num_gpus * self.accelerator.usable_bytes

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.accelerator.gpus_per_node)

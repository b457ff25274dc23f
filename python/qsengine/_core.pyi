"""Type stub for the private compiled module qsengine._core."""

__version__: str
FORMAT_VERSION: int

class ResourceLimitError(ValueError): ...

def hardware_threads() -> int: ...

# ---- packing (cpp/python/register_packing.cc)
import numpy as np
import numpy.typing as npt

COMPONENTS: tuple[str, ...]

class MemoryDesc:
    attention_bytes: float
    dense_ffn_bytes: float
    expert_bytes: float
    shared_expert_bytes: float
    router_bytes: float
    norm_bytes_per_layer: float
    final_norm_bytes: float
    embedding_bytes: float
    lm_head_bytes: float
    tie_embeddings: bool
    layer_is_moe: list[int]
    layer_has_kv: list[int]
    layer_is_local: list[int]
    routed_experts: int
    moe_intermediate: int
    num_heads: int
    num_kv_heads: int
    mla: bool
    kv_bytes_per_token_per_layer: float
    local_window: int
    hbm_bytes: float
    usable_fraction: float
    reserve_bytes: float
    def __init__(self) -> None: ...
    @property
    def usable_bytes(self) -> float: ...
    def validate(self) -> None: ...

class PlanDesc:
    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, etp: int = 0, attn_dp: bool = False) -> None: ...
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    attn_dp: bool
    @property
    def expert_tp(self) -> int: ...
    @property
    def label(self) -> str: ...

class PlanTable:
    def __len__(self) -> int: ...
    num_gpus: npt.NDArray[np.int64]
    tp: npt.NDArray[np.int64]
    pp: npt.NDArray[np.int64]
    dp: npt.NDArray[np.int64]
    ep: npt.NDArray[np.int64]
    etp: npt.NDArray[np.int64]
    units: npt.NDArray[np.int64]
    unit_batch: npt.NDArray[np.int64]
    cluster_batch: npt.NDArray[np.int64]
    binding_stage: npt.NDArray[np.int64]
    weight_bytes_max: npt.NDArray[np.float64]
    label: list[str]
    attn_dp: npt.NDArray[np.bool_]
    feasible: npt.NDArray[np.bool_]
    weights_fit: npt.NDArray[np.bool_]

class PackResult:
    plan: PlanDesc
    num_gpus: int
    num_units: int
    context: int
    capacity: float
    usable: float
    admissible_batch: int
    cluster_batch: int
    feasible: bool
    reason: str
    binding: str
    binding_gpu: int
    has_replicas: bool
    replicas: int
    imbalance_before: float
    imbalance_after: float
    cluster_batch_without_replicas: int
    has_paged: bool
    block_size: int
    offered: int
    placed: int
    rejected: int
    first_rejected: int
    kv_placed_bytes: float
    fragmentation_bytes: float
    tokens_placed: int
    unit: npt.NDArray[np.int64]
    stage: npt.NDArray[np.int64]
    dp_rank: npt.NDArray[np.int64]
    tp_rank: npt.NDArray[np.int64]
    ep_rank: npt.NDArray[np.int64]
    replica_bytes: npt.NDArray[np.float64]
    kv_bytes: npt.NDArray[np.float64]
    kv_per_sequence: npt.NDArray[np.float64]
    reserve: npt.NDArray[np.float64]
    unusable: npt.NDArray[np.float64]
    free: npt.NDArray[np.float64]
    overflow: npt.NDArray[np.float64]
    replica_count: npt.NDArray[np.int64]
    unit_batch: npt.NDArray[np.int64]
    expert_copies: npt.NDArray[np.int64]
    replica_expert: npt.NDArray[np.int64]
    replica_rank: npt.NDArray[np.int64]
    load_before: npt.NDArray[np.float64]
    load_after: npt.NDArray[np.float64]
    unit_sequences: npt.NDArray[np.int64]
    def weights(self, component: int) -> npt.NDArray[np.float64]: ...

def plan_violation(desc: MemoryDesc, plan: PlanDesc, num_gpus: int) -> str: ...
def check_plan(desc: MemoryDesc, plan: PlanDesc, num_gpus: int) -> tuple[str, str, str] | None: ...
def check_plan_shape(plan: PlanDesc) -> tuple[str, str, str] | None: ...
def parse_plan_label(text: str) -> PlanDesc: ...
def enumerate_plans(desc: MemoryDesc, num_gpus: int) -> list[PlanDesc]: ...
def stage_table(desc: MemoryDesc, plans: list[PlanDesc], num_gpus: int) -> dict[str, npt.NDArray]: ...

class AdmissionTable:
    def __init__(self, desc: MemoryDesc, plans: list[PlanDesc], num_gpus: int) -> None: ...
    def __len__(self) -> int: ...
    num_gpus: int
    usable: float
    local_window: int
    plans: list[PlanDesc]
    def stage_table(self) -> dict[str, npt.NDArray]: ...

def admissible_batches(
    table: AdmissionTable, plan_index: npt.ArrayLike, context: npt.ArrayLike,
    dense_ffn_bytes: npt.ArrayLike | None = None, threads: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.float64]]: ...
def search_plans(desc: MemoryDesc, g_lo: int, g_hi: int, context: int, threads: int = 0) -> PlanTable: ...
def min_gpus(desc: MemoryDesc, context: int, max_gpus: int) -> tuple[int, PlanDesc | None]: ...
def sample_lengths(values: npt.ArrayLike, weights: npt.ArrayLike, n: int, key0: int, key1: int, threads: int = 0) -> npt.NDArray[np.int64]: ...
def pack(desc: MemoryDesc, plan: PlanDesc, num_gpus: int, context: int, popularity: npt.ArrayLike | None = None,
         replicas: int = 0, lengths: npt.ArrayLike | None = None, block_size: int = 16) -> PackResult: ...
# --- routing (cpp/python/register_routing.cc) ---------------------------------
import numpy as np
import numpy.typing as npt

LOG_BIN_RATIO: float
REJECT_BUDGET: int

class Moments:
    n: int
    mean: float
    m2: float

class RouteResult:
    experts: int
    top_k: int
    batch: int
    microbatches: int
    layers: int
    gpus: int
    block_size: int
    blocks: int
    samples: int
    has_cost: bool
    layer_time: Moments
    step_time: Moments
    layer_time_lo: float
    step_time_lo: float
    @property
    def unique_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def gpu_unique_max_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def gpu_assign_max_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def tokens_per_expert_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def gpu_unique_sum(self) -> npt.NDArray[np.uint64]: ...
    @property
    def gpu_assign_sum(self) -> npt.NDArray[np.uint64]: ...
    @property
    def layer_weights(self) -> npt.NDArray[np.float64]: ...
    @property
    def layer_time_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def step_time_hist(self) -> npt.NDArray[np.uint64]: ...
    @property
    def selections(self) -> npt.NDArray[np.int32]: ...

def route(
    experts: int, top_k: int, batch: int, microbatches: int, layers: int, model_kind: int, weight_kind: int,
    alpha: float, ranks: int, weights: npt.ArrayLike | None, concentration: npt.ArrayLike | None, groups: int,
    top_groups: int, rho: float, trace: npt.ArrayLike | None, gpus: int, expert_gpus: list[list[int]],
    cost_a: npt.ArrayLike | None, cost_b: npt.ArrayLike | None, key0: int, key1: int, threads: int,
    memory_limit: int, record: bool,
) -> RouteResult: ...
def philox_raw(key0: int, key1: int, index: int, purpose: int, n: int) -> npt.NDArray[np.uint64]: ...

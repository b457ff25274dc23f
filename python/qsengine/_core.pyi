"""Type stub for the private compiled module qsengine._core."""

__version__: str
FORMAT_VERSION: int

class ResourceLimitError(ValueError): ...

def hardware_threads() -> int: ...

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

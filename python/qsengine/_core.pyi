"""Type stub for the private compiled module qsengine._core."""

__version__: str
FORMAT_VERSION: int

class ResourceLimitError(ValueError): ...

def hardware_threads() -> int: ...

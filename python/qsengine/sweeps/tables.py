"""Sweep results as typed arrow tables: per chunk (records or the
pipeline's columns, the same names and types), the inputs, and the assembled
frame in grid order."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from qsengine.sweeps.grid import FIELDS, _is_int, _is_real

if TYPE_CHECKING:
    from qsengine.sweeps.grid import _Points


def _column(values: list[Any]):
    """A typed arrow column: ints, floats (None -> NaN), bools (None -> null), else strings."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return pa.array([None if v is None else bool(v) for v in values], type=pa.bool_())
    if present and all(_is_int(v) for v in present) and len(present) == len(values):
        return pa.array([int(v) for v in values], type=pa.int64())
    if present and all(_is_real(v) for v in present):
        return pa.array([math.nan if v is None else float(v) for v in values], type=pa.float64())
    if not present:
        return pa.array(values, type=pa.null())
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _records_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            names.setdefault(k, None)
    return pa.table({k: _column([r.get(k) for r in rows]) for k in names})


def _columns_table(cols: Mapping[str, np.ndarray]):
    """The fast path's result columns as the table :func:`_records_table`
    makes of the same records (same names, order and arrow types)."""
    import pyarrow as pa

    from qsengine.decode.pipeline import RECORD_COLUMNS

    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "bool?": pa.bool_()}
    return pa.table({name: pa.array(cols[name], type=types[kind]) for name, kind in RECORD_COLUMNS})


def _inputs_table(points: _Points):
    """point_id + ``in_<field>`` columns for the unique points (grid order)."""
    import pyarrow as pa

    cols = {"point_id": pa.array(points.unique_ids, type=pa.string())}
    for k in FIELDS:
        distinct = _column([v.display for v in points.values[k]])
        cols[f"in_{k}"] = distinct.take(pa.array(points.codes[k][points.unique]))
    return pa.table(cols)


def _concat(tables: list):
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="default")


def _assemble(points: _Points, inputs, tables: list):
    """One row per grid position (grid order): inputs from the grid, results
    from the chunk tables (however they were chunked or read back)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def take(table, idx: np.ndarray):
        """``table.take(idx)``, skipped when idx is the identity (the common case:
        no duplicate points, chunks completed in grid order)."""
        if idx.size == table.num_rows and np.array_equal(idx, np.arange(idx.size)):
            return table
        return table.take(pa.array(idx))

    in_cols = set(inputs.column_names)
    unique_of = np.asarray(points.unique_of, dtype=np.int64)
    full = take(inputs, unique_of)
    if tables:
        res = _concat([t.drop_columns([c for c in t.column_names if c in in_cols and c != "point_id"])
                       for t in tables])
        at = pc.index_in(inputs.column("point_id"), value_set=res.column("point_id"))
        if at.null_count:  # pragma: no cover - guarded by construction
            raise RuntimeError(f"sweep: {at.null_count} point(s) have no result")
        res = take(res.drop_columns(["point_id"]), at.to_numpy().astype(np.int64)[unique_of])
        for name in res.column_names:
            full = full.append_column(name, res.column(name))
    return full.to_pandas()

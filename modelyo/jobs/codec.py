"""How values travel to and from a job: typed, safe formats first, pickle only on request.

| codec     | values                                                    | file        |
|-----------|-----------------------------------------------------------|-------------|
| `parquet` | pandas DataFrame or Series (dtypes, missing values, index) | `NAME.parquet` |
| `json`    | None, bool, int, float, str, and lists/dicts of them      | `NAME.json` |
| `pickle`  | anything else, only with `allow_pickle=True`              | `NAME.pickle` |

DataFrames are written by row groups, so a large frame is never copied whole into Arrow
memory. Parquet alone loses a few pandas dtypes (object columns of strings come back as `str`,
`datetime64[s]` as `[ms]`, index level names and nullable index levels), so the writer stores
each column's and index level's pandas dtype in the file's metadata (key `modelyo`) and the
reader casts back to it.

JSON keeps the distinction between int, float and bool, and allows NaN and infinities (both
ends are Python). Tuples, sets, bytes and dicts with non-str keys are refused rather than
silently turned into something else. Reading a pickle runs code chosen by whoever wrote it, so
`read_value` refuses the `pickle` codec unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from modelyo.errors import CodecError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

CODECS = ("parquet", "json", "pickle")
EXTENSIONS = {"parquet": "parquet", "json": "json", "pickle": "pickle"}
# Key of Modelyo's own entry in the Parquet file's key-value metadata.
METADATA_KEY = b"modelyo"
METADATA_VERSION = 1
# Rows per row group are chosen so one group's Arrow conversion stays near this many bytes.
ROW_GROUP_BYTES = 64 << 20
MIN_ROW_GROUP = 1_024
MAX_ROW_GROUP = 1_000_000
PICKLE_HINT = "pass --allow-pickle (trusted code only)"


# --- DataFrames and Series -----------------------------------------------------------------------


def write_dataframe(df: pd.DataFrame, sink: BinaryIO) -> None:
    """Write `df` as Parquet to `sink` (any writable binary stream, seekable or not).

    Raises `CodecError` for what Parquet cannot hold faithfully: non-string or duplicate
    column names, and columns mixing Python types.
    """
    _write_frame(df, sink, _frame_schema(df), series_name=None, is_series=False)


def read_dataframe(source: BinaryIO | bytes) -> pd.DataFrame:
    """Read a DataFrame written by `write_dataframe` (or a Series written by `write_value`,
    as a one-column frame) from bytes or a binary stream."""
    frame, _meta = _read_frame(source)
    return frame


def _write_frame(
    df: Any, sink: BinaryIO, schema: pa.Schema, *, series_name: Any, is_series: bool
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = _frame_metadata(df, series_name=series_name, is_series=is_series)
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: meta})
    rows = len(df)
    step = _rows_per_group(df)
    try:
        with pq.ParquetWriter(sink, schema) as writer:
            # One row group at a time: only a slice is ever converted to Arrow memory.
            for start in range(0, max(rows, 1), step):
                part = df.iloc[start : start + step]
                table = pa.Table.from_pandas(part, schema=schema, preserve_index=None)
                writer.write_table(table, row_group_size=step)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise CodecError(f"cannot write the DataFrame as Parquet: {exc}") from None


def _frame_schema(df: Any) -> pa.Schema:
    import pyarrow as pa

    if not all(isinstance(c, str) for c in df.columns):
        odd = next(c for c in df.columns if not isinstance(c, str))
        raise CodecError(
            f"DataFrame column name {odd!r} is a {type(odd).__name__}, not a str: Parquet "
            "stores only string column names; rename the columns "
            "(df.columns = df.columns.astype(str)) or " + PICKLE_HINT
        )
    if df.columns.has_duplicates:
        dupes = sorted(set(df.columns[df.columns.duplicated()]))
        raise CodecError(f"DataFrame has duplicate column names {dupes}; make them unique")
    names = [n for n in df.index.names if n is not None]
    clash = sorted(set(names) & set(df.columns))
    if clash:
        raise CodecError(
            f"DataFrame index level names {clash} are also column names; rename one of them"
        )
    try:
        # Inferred from the whole frame, so a column that is all missing in the first row
        # group still gets the type its later values need.
        return pa.Schema.from_pandas(df, preserve_index=None)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise CodecError(
            f"cannot store this DataFrame as Parquet ({exc}); give each column one type, "
            "or " + PICKLE_HINT
        ) from None


def _rows_per_group(df: Any) -> int:
    rows = len(df)
    if rows == 0:
        return 1
    per_row = max(1, int(df.memory_usage(index=True, deep=False).sum()) // rows)
    return max(MIN_ROW_GROUP, min(MAX_ROW_GROUP, ROW_GROUP_BYTES // per_row))


def _dtype_record(dtype: Any, *, empty: bool = False) -> dict[str, Any]:
    import pandas as pd

    record: dict[str, Any] = {"dtype": str(dtype)}
    if empty and isinstance(dtype, pd.CategoricalDtype):
        # Without rows Parquet writes no dictionary: keep the categories here (if JSON-able).
        try:
            record["categories"] = to_json_value(list(dtype.categories))
            record["ordered"] = bool(dtype.ordered)
        except CodecError:
            pass
    if isinstance(dtype, pd.StringDtype):
        # "string" names several dtypes: the storage and the missing-value marker tell them apart.
        record["storage"] = dtype.storage
        record["na_nan"] = dtype.na_value is not pd.NA
    return record


def _frame_metadata(df: Any, *, series_name: Any, is_series: bool) -> bytes:
    document = {
        "version": METADATA_VERSION,
        "kind": "series" if is_series else "dataframe",
        "series_name": series_name,
        "columns": [_dtype_record(df[c].dtype, empty=len(df) == 0) for c in df.columns],
        "columns_index": _dtype_record(df.columns.dtype),
        "index_names": list(df.index.names),
        "index_dtypes": [
            _dtype_record(df.index.get_level_values(i).dtype) for i in range(df.index.nlevels)
        ],
    }
    try:
        return json.dumps(document).encode()
    except TypeError:
        raise CodecError(
            f"the index level names {list(df.index.names)!r} cannot be stored; use str names"
        ) from None


def _read_frame(source: BinaryIO | bytes) -> tuple[pd.DataFrame, dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(source, bytes | bytearray | memoryview):
        source = pa.BufferReader(source)  # type: ignore[assignment]
    else:
        # Read whole (compressed Parquet, smaller than the frame) and never hand Arrow a
        # Python file object: Arrow's thread pool then aborts the interpreter now and then at
        # exit ("terminate called without an active exception"; apache/arrow#34314, #50482),
        # seen here in about one run in ten. A pipe would have to be read whole anyway.
        source = pa.BufferReader(source.read())  # type: ignore[assignment]
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CodecError(f"the value is not a readable Parquet file: {exc}") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        raise CodecError("the Parquet file's modelyo metadata is not JSON") from None
    frame = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    if meta:
        frame = _restore(frame, meta)
    return frame, meta


def _wanted(record: dict[str, Any]) -> Any:
    import pandas as pd

    if "storage" in record:
        na = float("nan") if record.get("na_nan") else pd.NA
        return pd.StringDtype(record["storage"], na_value=na)
    return pd.api.types.pandas_dtype(record["dtype"])


def _cast(values: Any, record: dict[str, Any]) -> Any:
    """`values` (Series or Index) as the dtype `record` names, if it is not already."""
    if record["dtype"] == "category":
        if "categories" in record and len(values) == 0:
            import pandas as pd

            dtype = pd.CategoricalDtype(record["categories"], ordered=record["ordered"])
            return values.astype(dtype)
        return values  # Arrow's dictionaries restore categories and their order themselves
    wanted = _wanted(record)
    if values.dtype == wanted and str(values.dtype) == record["dtype"]:
        return values
    if str(wanted) == "object":
        # Missing values of an object column are None, as pandas makes them, not NaN.
        cast = values.astype(object)
        return cast.where(values.notna(), None)
    return values.astype(wanted)


def _restore(frame: Any, meta: dict[str, Any]) -> Any:
    import pandas as pd

    if meta.get("version") != METADATA_VERSION:
        raise CodecError(
            f"the Parquet value was written by a newer Modelyo (metadata version "
            f"{meta.get('version')!r}); upgrade modelyo here"
        )
    records = meta.get("columns", [])
    if len(records) == len(frame.columns):
        for position, record in enumerate(records):
            column = frame.iloc[:, position]
            cast = _cast(column, record)
            if cast is not column:
                frame.isetitem(position, cast)
    if "columns_index" in meta:
        frame.columns = _cast(frame.columns, meta["columns_index"])
    names, dtypes = meta.get("index_names", []), meta.get("index_dtypes", [])
    if len(names) == frame.index.nlevels and len(dtypes) == len(names):
        if frame.index.nlevels == 1:
            frame.index = _cast(frame.index, dtypes[0]).rename(names[0])
        else:
            levels = [_cast(frame.index.get_level_values(i), dtypes[i]) for i in range(len(names))]
            frame.index = pd.MultiIndex.from_arrays(levels, names=names)
    return frame


# --- any value ----------------------------------------------------------------------------------


def _is_pandas(value: object, kind: str) -> bool:
    # No DataFrame can exist unless pandas was imported: do not import it for a plain int.
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, getattr(pandas, kind))


@dataclass(frozen=True)
class Encoding:
    """How `write_value` writes a value, decided (and checked) before anything is written."""

    codec: str
    value: object
    frame: Any = None  # parquet: the frame to write (a Series as a one-column frame)
    schema: Any = None
    series_name: Any = None
    is_series: bool = False
    plain: Any = None  # json: the value as plain JSON types


def plan_value(value: object, *, allow_pickle: bool = False) -> Encoding:
    """The codec `value` will be written with, or `CodecError` (see `write_value`). Cheap
    next to writing: a frame's schema is inferred, nothing is encoded."""
    if _is_pandas(value, "DataFrame") or _is_pandas(value, "Series"):
        is_series = _is_pandas(value, "Series")
        frame: Any = value
        name = None
        try:
            if is_series:
                name = value.name  # type: ignore[attr-defined]
                if not (name is None or isinstance(name, str | int | float | bool)):
                    raise CodecError(f"the Series name {name!r} cannot be stored; use a str")
                frame = value.to_frame(name="values")  # type: ignore[attr-defined]
            schema = _frame_schema(frame)
        except CodecError:
            if not allow_pickle:
                raise
            return Encoding("pickle", value)
        return Encoding("parquet", value, frame, schema, name, is_series)
    try:
        plain = to_json_value(value)
    except CodecError as exc:
        if not allow_pickle:
            raise CodecError(f"{exc}; {PICKLE_HINT}") from None
        return Encoding("pickle", value)
    return Encoding("json", value, plain=plain)


def write_planned(encoding: Encoding, sink: BinaryIO) -> None:
    """Write a value as `plan_value` decided."""
    if encoding.codec == "parquet":
        _write_frame(
            encoding.frame,
            sink,
            encoding.schema,
            series_name=encoding.series_name,
            is_series=encoding.is_series,
        )
    elif encoding.codec == "json":
        sink.write(json.dumps(encoding.plain, allow_nan=True, ensure_ascii=False).encode())
    else:
        _write_pickle(encoding.value, sink)


def write_value(value: object, sink: BinaryIO, *, allow_pickle: bool = False) -> str:
    """Write `value` to `sink` in the first codec that holds it faithfully; return the codec.

    DataFrame and Series → "parquet"; JSON-able values → "json"; anything else → "pickle" if
    `allow_pickle`, else `CodecError` naming the type.
    """
    encoding = plan_value(value, allow_pickle=allow_pickle)
    write_planned(encoding, sink)
    return encoding.codec


def _write_pickle(value: object, sink: BinaryIO) -> str:
    try:
        pickle.dump(value, sink, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise CodecError(f"cannot pickle the {_type_name(value)} value: {exc}") from None
    return "pickle"


def read_value(source: BinaryIO | bytes, codec: str, *, allow_pickle: bool = False) -> object:
    """Read a value `write_value` wrote with `codec`. A "pickle" value is refused unless
    `allow_pickle`: unpickling runs code chosen by whoever wrote it."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; known codecs: {', '.join(CODECS)}")
    if codec == "parquet":
        frame, meta = _read_frame(source)
        if meta.get("kind") == "series":
            series = frame.iloc[:, 0]
            series.name = meta.get("series_name")
            return series
        return frame
    data = bytes(source) if isinstance(source, bytes | bytearray | memoryview) else source.read()
    if codec == "json":
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CodecError(f"the value is not valid JSON: {exc}") from None
    if not allow_pickle:
        raise CodecError(
            "this value is a pickle, and reading it runs code chosen by its writer; "
            "pass --allow-pickle (allow_pickle=True) only for values from code you trust"
        )
    try:
        return pickle.loads(data)  # noqa: S301 - the caller opted in explicitly
    except Exception as exc:  # unpickling can raise anything the pickled classes raise
        raise CodecError(f"the pickled value could not be loaded: {exc!r}") from None


def to_json_value(value: object, where: str = "value") -> Any:
    """`value` as plain JSON types (numpy scalars converted), or `CodecError` naming the part
    that is not JSON: tuples, sets, bytes, dicts with non-str keys, other objects."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        # bool was handled above; int/float subclasses (numpy.float64) become plain ones.
        return int(value) if isinstance(value, int) else float(value)
    if _is_numpy_scalar(value):
        item = value.item()  # type: ignore[attr-defined]
        if isinstance(item, bool | int | float | str):
            return item
    if isinstance(value, list):
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(
                    f"{where} has the {type(key).__name__} key {key!r}: JSON dict keys must be str"
                )
            out[key] = to_json_value(item, f"{where}[{key!r}]")
        return out
    extra = " (convert it to a list)" if isinstance(value, tuple | set | frozenset) else ""
    raise CodecError(f"{where} is a {_type_name(value)}, which is not JSON{extra}")


def _is_numpy_scalar(value: object) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def _type_name(value: object) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def encode_value(value: object, *, allow_pickle: bool = False) -> tuple[str, bytes]:
    """`write_value` into memory: (codec, bytes)."""
    buffer = io.BytesIO()
    codec = write_value(value, buffer, allow_pickle=allow_pickle)
    return codec, buffer.getvalue()

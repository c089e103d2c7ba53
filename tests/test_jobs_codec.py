"""The job value codecs: DataFrames and Series as Parquet with their dtypes, JSON for plain
values, pickle only when asked for, at both ends."""

from __future__ import annotations

import io
import os
import pickle
import threading
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from modelyo.errors import CodecError
from modelyo.jobs import codec
from modelyo.jobs.codec import CODECS, read_dataframe, read_value, write_dataframe, write_value


def mixed_frame(rows: int = 6) -> pd.DataFrame:
    """Every dtype a data scientist's frame commonly has, with missing values in each."""
    base = pd.Timestamp("2024-03-01 12:00")
    frame = pd.DataFrame(
        {
            "i": np.arange(rows, dtype="int64"),
            "f": [1.5, np.nan, *np.linspace(0, 1, rows - 2)],
            "obj": pd.Series(["a", None, *["xyz"] * (rows - 2)], dtype=object),
            "s": ["p", "q", None, *["r"] * (rows - 3)],
            "I": pd.array([1, None, *range(rows - 2)], dtype="Int64"),
            "b": pd.array([True, None, *[False] * (rows - 2)], dtype="boolean"),
            "S": pd.array(["u", None, *["v"] * (rows - 2)], dtype="string"),
            "tz": pd.date_range("2024-01-01", periods=rows, tz="Europe/Zurich", freq="h"),
            "naive": [base, pd.NaT, *[base + pd.Timedelta(days=d) for d in range(rows - 2)]],
            "secs": pd.Series([base] * rows).astype("datetime64[s]"),
            "cat": pd.Categorical(
                ["lo", "hi", None, *["lo"] * (rows - 3)],
                categories=["lo", "mid", "hi"],
                ordered=True,
            ),
            "delta": pd.to_timedelta(np.arange(rows), unit="s"),
        }
    )
    frame.index = pd.Index([f"row{n}" for n in range(rows)], name="patient")
    return frame


def roundtrip(value: object, **kwargs: bool) -> tuple[str, object]:
    sink = io.BytesIO()
    used = write_value(value, sink, **kwargs)
    return used, read_value(sink.getvalue(), used, **kwargs)


def assert_same_frame(expected: pd.DataFrame, actual: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(expected, actual, check_exact=True)
    assert list(expected.dtypes) == list(actual.dtypes)
    assert expected.index.names == actual.index.names
    assert list(getattr(expected.index, "dtypes", [expected.index.dtype])) == list(
        getattr(actual.index, "dtypes", [actual.index.dtype])
    )
    assert expected.columns.dtype == actual.columns.dtype


def test_codecs_are_the_documented_three():
    assert CODECS == ("parquet", "json", "pickle")


def test_a_mixed_type_frame_round_trips_with_identical_dtypes():
    frame = mixed_frame()
    sink = io.BytesIO()
    write_dataframe(frame, sink)
    back = read_dataframe(sink.getvalue())
    assert_same_frame(frame, back)
    # Missing values stay what pandas makes them: None in object columns.
    assert back["obj"].iloc[1] is None
    assert back["cat"].cat.ordered and list(back["cat"].cat.categories) == ["lo", "mid", "hi"]
    assert str(back["tz"].dtype.tz) == "Europe/Zurich"
    # read from a stream as well as from bytes
    sink.seek(0)
    assert_same_frame(frame, read_dataframe(sink))


def test_multiindex_with_an_unnamed_nullable_level_round_trips():
    frame = mixed_frame()
    frame.index = pd.MultiIndex.from_arrays(
        [["a", "a", "b", "b", "c", "c"], pd.array([1, None, 3, 4, 5, 6], dtype="Int64")],
        names=["site", None],
    )
    used, back = roundtrip(frame)
    assert used == "parquet"
    assert_same_frame(frame, back)


def test_range_index_and_empty_frames_round_trip():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    assert_same_frame(frame, roundtrip(frame)[1])
    assert isinstance(roundtrip(frame)[1].index, pd.RangeIndex)
    empty = mixed_frame().iloc[:0]
    assert_same_frame(empty, roundtrip(empty)[1])


def test_series_round_trip_with_name_dtype_and_index():
    series = pd.Series(pd.array([1, None, 3], dtype="Int64"), index=["a", "b", "c"], name="n")
    used, back = roundtrip(series)
    assert used == "parquet"
    pd.testing.assert_series_equal(series, back, check_exact=True)
    unnamed = pd.Series(["x", None], dtype=object)
    pd.testing.assert_series_equal(unnamed, roundtrip(unnamed)[1])
    assert roundtrip(unnamed)[1].name is None


def test_frames_parquet_cannot_hold_are_refused_clearly():
    with pytest.raises(CodecError, match=r"column name 3 is a int.*--allow-pickle"):
        roundtrip(pd.DataFrame({3: [1]}))
    with pytest.raises(CodecError, match="duplicate column names"):
        roundtrip(pd.DataFrame([[1, 2]], columns=["a", "a"]))
    mixed = pd.DataFrame({"m": pd.Series([1, "a"], dtype=object)})
    with pytest.raises(CodecError, match=r"give each column one type.*--allow-pickle"):
        roundtrip(mixed)
    # ... unless pickle is allowed, where it round-trips as a pickle
    used, back = roundtrip(mixed, allow_pickle=True)
    assert used == "pickle"
    pd.testing.assert_frame_equal(mixed, back)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        3.25,
        float("nan"),
        float("inf"),
        "text ü",
        [],
        [1, "a", None, [2.5, False]],
        {"a": 1, "b": {"c": [1, 2]}, "": None},
    ],
)
def test_json_values_round_trip_exactly(value):
    used, back = roundtrip(value)
    assert used == "json"
    if isinstance(value, float) and value != value:
        assert back != back
    else:
        assert back == value and type(back) is type(value)


def test_numpy_scalars_become_plain_json_values():
    value = {
        "i": np.int64(7),
        "f": np.float32(0.5),
        "b": np.bool_(True),
        "l": [np.uint8(3), np.float64(1.25)],
    }
    used, back = roundtrip(value)
    assert used == "json"
    assert back == {"i": 7, "f": 0.5, "b": True, "l": [3, 1.25]}
    assert type(back["i"]) is int and type(back["b"]) is bool


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), r"value is a object, which is not JSON"),
        ((1, 2), r"value is a tuple, which is not JSON \(convert it to a list\)"),
        ({1: "a"}, r"value has the int key 1: JSON dict keys must be str"),
        ({"a": [1, {2, 3}]}, r"value\['a'\]\[1\] is a set"),
        (np.arange(3), r"value is a numpy.ndarray"),
        (b"raw", r"value is a bytes"),
    ],
)
def test_other_values_are_refused_without_allow_pickle(value, message):
    sink = io.BytesIO()
    with pytest.raises(CodecError, match=message) as caught:
        write_value(value, sink)
    assert "pass --allow-pickle (trusted code only)" in str(caught.value)
    assert sink.getvalue() == b""


def test_pickle_only_when_allowed_at_both_ends():
    value = {"when": pd.Timestamp("2024-01-01"), "t": (1, 2), "arr": np.arange(3)}
    sink = io.BytesIO()
    assert write_value(value, sink, allow_pickle=True) == "pickle"
    data = sink.getvalue()
    with pytest.raises(CodecError, match=r"pickle.*runs code.*--allow-pickle"):
        read_value(data, "pickle")
    back = read_value(data, "pickle", allow_pickle=True)
    assert back["t"] == (1, 2) and back["when"] == value["when"]
    assert (back["arr"] == value["arr"]).all()


def test_reading_a_pickle_without_opt_in_runs_nothing():
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    data = pickle.dumps(Boom())
    with pytest.raises(CodecError, match="runs code"):
        read_value(data, "pickle")


def test_bad_codecs_and_bad_bytes_are_reported():
    with pytest.raises(CodecError, match=r"unknown codec 'yaml'; known codecs: parquet, json"):
        read_value(b"", "yaml")
    with pytest.raises(CodecError, match="not valid JSON"):
        read_value(b"{nope", "json")
    with pytest.raises(CodecError, match="not a readable Parquet file"):
        read_value(b"PAR1 garbage", "parquet")


def test_writing_to_a_pipe_and_reading_from_a_pipe():
    frame = mixed_frame(50)
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            received.extend(pipe.read())

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(write_end, "wb") as pipe:
        write_dataframe(frame, pipe)
    reader.join()
    # A non-seekable source is read whole, then parsed.
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: os.write(write_end, received) and os.close(write_end))
    writer.start()
    with os.fdopen(read_end, "rb") as pipe:
        assert_same_frame(frame, read_dataframe(pipe))
    writer.join()


@pytest.mark.slow
def test_a_ten_million_row_frame_is_written_by_row_groups():
    rows = 10_000_000
    frame = pd.DataFrame(
        {
            "a": np.arange(rows, dtype="int64"),
            "b": np.random.default_rng(1).random(rows),
        }
    )
    size = int(frame.memory_usage(deep=True).sum())  # 160 MB
    sink = io.BytesIO()
    tracemalloc.start()
    try:
        write_dataframe(frame, sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Arrow's own buffers are not traced; the Parquet output (in the BytesIO) is. What must not
    # happen is a whole-frame copy on the Python side on top of the output.
    assert peak < sink.tell() + size // 2, (peak, sink.tell(), size)
    meta = pq.ParquetFile(io.BytesIO(sink.getvalue())).metadata
    assert meta.num_rows == rows
    assert meta.num_row_groups >= 5
    assert meta.row_group(0).num_rows <= codec.MAX_ROW_GROUP
    back = read_dataframe(sink.getvalue())
    assert len(back) == rows and back["a"].iloc[-1] == rows - 1
    assert back.dtypes.equals(frame.dtypes)

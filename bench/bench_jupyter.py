"""Jupyter benchmark: what `%%modelyo_run` costs over plain Docker.

Run: `.venv/bin/python bench/bench_jupyter.py [--rounds N] [--rows N]`
     `.venv/bin/python bench/bench_jupyter.py --big-rows 10000000` (memory only, see 3.)

1. A trivial cell (`print("hi")`) through `%%modelyo_run` (IPython's InteractiveShell in this
   process, the magic as a user calls it) against `docker run --rm` of the same image running the
   same Python. Both start a fresh container on this machine's Docker engine, so the ratio is the
   magic's own cost: attested mutual-TLS sessions with the CA and the agent, key release,
   packaging and encrypting the job, the upload, the in-container runner (decrypting through
   /modelyo), the encrypted result back.
2. A DataFrame of `--rows` rows (default 1 million; ints, floats, strings, a categorical,
   nullable ints, tz-aware timestamps) round trip, `%%modelyo_run -i df -o df2` with
   `df2 = df`, against two references measured in the same run:
   - plain Docker doing the same round trip with no encryption or attestation: write the frame
     as Parquet here, `docker cp` it into a fresh container of the same image that reads it with
     pandas and writes it back as Parquet, `docker cp` it out and read it here. The ratio is
     what confidentiality costs for data in motion;
   - the frame written as Parquet and read back here, in memory: the codec alone, the floor of
     any typed transfer (the magic does this twice, once on each side).

3. With `--big-rows N` (instead of 1. and 2.): the memory a job costs the client. A frame of N
   rows (int64, float64, short strings, tz-aware datetimes, a categorical) is sent through
   `modelyo.jobs` (`n = len(df)`), then round-tripped (`df2 = df`); for each, the growth of
   this process's peak RSS (VmHWM, reset before the job) is printed as a ratio to the frame's
   own size (`df.memory_usage(deep=True)`). The round trip brings a second frame back, so its
   floor is 1x.

Rounds are interleaved (ours, then the references, each round) and the medians are compared, so
the ratios hold even when the machine's speed drifts. The local stack (simulated platform) runs
on this machine, so there is no network in the numbers: on a real VM, add the link's time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import docker
import numpy as np
import pandas as pd

from modelyo import dev
from modelyo.cli.main import main as modelyo
from modelyo.images.base import DEFAULT_TAG

TRIVIAL = 'print("hi")'
COPY_SCRIPT = (
    "import pandas as pd; pd.read_parquet('/tmp/in.parquet').to_parquet('/tmp/out.parquet')"
)


def frame(rows: int, seed: int = 1) -> pd.DataFrame:
    """A mixed-type frame of `rows` rows, like a real table."""
    rng = np.random.default_rng(seed)
    visits = pd.array(rng.integers(0, 20, rows), dtype="Int64")
    visits[rng.random(rows) < 0.05] = pd.NA
    return pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "value": rng.normal(size=rows),
            "name": pd.array([f"patient-{i % 50_000}" for i in range(rows)], dtype="string"),
            "ward": pd.Categorical(rng.choice(["cardio", "onco", "neuro", "icu"], rows)),
            "visits": visits,
            "seen": pd.Timestamp("2025-01-01", tz="Europe/Paris")
            + pd.to_timedelta(rng.integers(0, 10**6, rows), unit="s"),
        }
    )


def big_frame(rows: int, seed: int = 2) -> pd.DataFrame:
    """A frame of `rows` rows built without large temporaries (peak RSS is what we measure)."""
    rng = np.random.default_rng(seed)
    names = pd.Index([f"p{i}" for i in range(1_000)], dtype="str")
    return pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "value": rng.normal(size=rows),
            "name": names.take(rng.integers(0, len(names), rows)),
            "seen": pd.DatetimeIndex(
                pd.Timestamp("2025-01-01").value + rng.integers(0, 10**15, rows), tz="UTC"
            ).tz_convert("Europe/Paris"),
            "ward": pd.Categorical.from_codes(
                rng.integers(0, 4, rows), ["cardio", "onco", "neuro", "icu"]
            ),
        }
    )


def rss_kib(field: str) -> int:
    """This process's VmRSS or VmHWM (peak) in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth(action: Callable[[], object]) -> int:
    """Bytes by which this process's peak RSS exceeds its RSS before `action`."""
    gc.collect()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    action()
    return (rss_kib("VmHWM") - before) * 1024


def big_memory(rows: int) -> None:
    """3. in the module docstring."""
    from modelyo.jobs import JobSpec, open_session

    t0 = time.perf_counter()
    df = big_frame(rows)
    size = int(df.memory_usage(deep=True).sum())
    print(
        f"{rows:,}-row frame: {size / 2**20:.0f} MiB in memory (built in "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    with open_session() as session:
        for what, code, outputs in (
            ("send", "n = len(df)", ["n"]),
            ("round trip", "df2 = df", ["df2"]),
        ):
            result = None

            def job(code: str = code, outputs: list[str] = outputs) -> None:
                nonlocal result
                result = session.run(JobSpec(code, inputs={"df": df}, outputs=outputs))

            t0 = time.perf_counter()
            grown = peak_growth(job)
            seconds = time.perf_counter() - t0
            assert result is not None and result.exit_code == 0
            back = result.outputs[outputs[0]]
            assert back == rows if what == "send" else len(back) == rows
            result = None
            print(
                f"    {what}: {seconds:.1f} s, peak RSS +{grown / 2**20:.0f} MiB = "
                f"{grown / size:.2f}x the frame"
            )


def timed(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


class Magic:
    """`%%modelyo_run` in an in-process IPython shell, output captured."""

    def __init__(self) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.shell = InteractiveShell.instance()
        self.shell.run_line_magic("load_ext", "modelyo_jupyter")

    def run(self, line: str, cell: str) -> str:
        from IPython.utils.capture import capture_output

        with capture_output() as captured:
            self.shell.run_cell_magic("modelyo_run", line, cell)
        return captured.stdout


def docker_trivial(engine: docker.DockerClient) -> None:
    out = engine.containers.run(
        DEFAULT_TAG, ["python", "-c", TRIVIAL], remove=True, network_disabled=True
    )
    assert out.strip() == b"hi", out


def _tar_one(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def docker_round_trip(engine: docker.DockerClient, df: pd.DataFrame) -> pd.DataFrame:
    """The same round trip with plain Docker: Parquet in by `docker cp`, back the same way."""
    sink = io.BytesIO()
    df.to_parquet(sink)
    container = engine.containers.create(
        DEFAULT_TAG, ["python", "-c", COPY_SCRIPT], network_disabled=True
    )
    try:
        container.put_archive("/tmp", _tar_one("in.parquet", sink.getvalue()))
        container.start()
        status = container.wait(timeout=600)
        assert status["StatusCode"] == 0, container.logs()
        stream, _ = container.get_archive("/tmp/out.parquet")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile("out.parquet")
            assert member is not None
            return pd.read_parquet(io.BytesIO(member.read()))
    finally:
        container.remove(force=True)


def local_parquet(df: pd.DataFrame) -> pd.DataFrame:
    sink = io.BytesIO()
    df.to_parquet(sink)
    return pd.read_parquet(io.BytesIO(sink.getvalue()))


def report(what: str, ours: list[float], refs: dict[str, list[float]]) -> None:
    mine = statistics.median(ours)
    print(f"{what}: %%modelyo_run {mine * 1000:.0f} ms (min {min(ours) * 1000:.0f})")
    for name, times in refs.items():
        ref = statistics.median(times)
        print(
            f"    vs {name}: {ref * 1000:.0f} ms (min {min(times) * 1000:.0f}); "
            f"ratio {mine / ref:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big-rows", type=int, default=0, help="measure memory only (see 3.)")
    args = parser.parse_args()
    engine = docker.from_env(timeout=600)
    engine.images.get(DEFAULT_TAG)  # `modelyo image build-base` first if this fails
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="modelyo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MODELYO_DEV_DIR"] = str(tmp / "dev")
        for var in ("MODELYO_CA_URL", "MODELYO_TDX_URL"):
            os.environ.pop(var, None)
        dev.up(tmp / "dev", ca_port=0, agent_port=0)
        try:
            (tmp / "ws").mkdir()
            os.chdir(tmp / "ws")  # the magic's workspace is the current folder
            with contextlib.redirect_stdout(io.StringIO()):
                if modelyo(["attest"]) != 0:
                    sys.exit("bench: `modelyo attest` against the local stack failed")
            if args.big_rows:
                big_memory(args.big_rows)
                return
            magic = Magic()
            # Warm-up, untimed: imports, the first TLS sessions, the image in the page cache.
            assert "hi" in magic.run("-q", TRIVIAL)
            docker_trivial(engine)

            ours, plain = [], []
            for _ in range(args.rounds):
                ours.append(timed(lambda: magic.run("-q", TRIVIAL)))
                plain.append(timed(lambda: docker_trivial(engine)))
            report(
                "trivial cell",
                ours,
                {f"docker run --rm {DEFAULT_TAG} python -c 'print(\"hi\")'": plain},
            )

            df = frame(args.rows)
            size = df.memory_usage(deep=True).sum()
            shell_ns = magic.shell.user_ns
            shell_ns["df"] = df
            magic.run("-q -i df -o df2", "df2 = df")
            pd.testing.assert_frame_equal(shell_ns["df2"], df)  # types intact, or no numbers
            ours, cp, codec = [], [], []
            for _ in range(args.rounds):
                shell_ns.pop("df2", None)
                ours.append(timed(lambda: magic.run("-q -i df -o df2", "df2 = df")))
                assert len(shell_ns["df2"]) == args.rows
                cp.append(timed(lambda: docker_round_trip(engine, df)))
                codec.append(timed(lambda: local_parquet(df)))
            report(
                f"{args.rows:,}-row DataFrame round trip ({size / 2**20:.0f} MiB in memory)",
                ours,
                {
                    "plain docker: Parquet, docker cp in, pandas in a container, docker cp out": cp,
                    "Parquet write+read here, in memory (the codec alone)": codec,
                },
            )
        finally:
            os.chdir(cwd)
            dev.down(tmp / "dev")


if __name__ == "__main__":
    main()

"""Benchmark `modelyo encrypt`/`decrypt` against `cp` and age, side by side and interleaved.

    .venv/bin/python bench/bench_encryption.py [--size-mib 1024] [--rounds 5] [--files 2000]
                                               [--dir DIR]

Needs age (`apt-get install age` on Debian); installs nothing itself. Everything runs in a
temporary folder under --dir (default: the system temp folder), so inputs and outputs share
one filesystem. Every round runs every command once, in a shuffled order, each after reading
its inputs and a `sync` (not timed), so no command pays for another's dirty pages or evicted
inputs. Ratios are given on medians and on the best run of each command (on a noisy VM,
interference only ever adds time, so the best run shows what the command can do).

Targets (from the issue): for a 1 GiB file, encrypt >= 1.5x age and decrypt >= 2x age, both
>= 0.7x cp; peak memory < 64 MiB; a tree of 2000 files of 4 KiB at >= 0.8x the files per
second of `cp -r`. `cp` and age do not fsync, so the like-for-like rows use --no-fsync; the
default (durable: fsync before the name appears) is compared with `cp` followed by `sync`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
_FRESH = itertools.count(1)  # suffixes of fresh output names
_API_SCRIPT = """
import sys, time
from modelyo.encryption import StaticKeySource, read_key_file
from modelyo.encryption import encrypt_file, decrypt_file, encrypt_tree, decrypt_tree
op, src, dst, key = sys.argv[1:5]
keys = StaticKeySource.single(read_key_file(key))
fn = {"enc": encrypt_file, "dec": decrypt_file, "tenc": encrypt_tree, "tdec": decrypt_tree}[op]
t = time.perf_counter()
fn(src, dst, keys, fsync=False)
print(time.perf_counter() - t)
"""


@dataclass
class Op:
    """One command to time: its argv, what it creates (removed between runs)."""

    name: str
    argv: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    warmup: list[str] = field(default_factory=list)  # run untimed first (loads Python's files)
    inner_time: bool = False  # the command prints its own elapsed time (API runs)
    fresh_outputs: bool = False  # write to a new name each run; remove at the end of the phase
    times: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def run(op: Op) -> None:
    """Run `op` once with warm inputs after a sync; record wall time, peak RSS and CPU use."""
    argv = op.argv
    if op.fresh_outputs:
        # A new output name every run, nothing deleted until the phase ends (README).
        for out in op.outputs:
            argv = [a.replace(str(out), f"{out}-{next(_FRESH)}") for a in argv]
    else:
        for out in op.outputs:
            _remove(out)
    for path in op.inputs:
        _warm(path)
    if op.warmup:
        subprocess.run(op.warmup, capture_output=True, check=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0:
        raise SystemExit(f"{op.name} failed ({proc.returncode}): {err.decode(errors='replace')}")
    # CPU use over the process's whole life: 200% means both cores were busy throughout.
    op.cpu.append((usage.ru_utime + usage.ru_stime) / max(elapsed, 1e-9))
    if op.inner_time:
        elapsed = float(out.decode().strip().splitlines()[-1])
    op.times.append(elapsed)
    op.rss_kib.append(usage.ru_maxrss)


def _warm(path: Path) -> None:
    """Read `path` (a file, or every file of a folder) so it is in the page cache: some VMs
    page out idle page cache within seconds (DAMON), which would time the disk instead."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        with f.open("rb", buffering=0) as handle:
            while handle.read(8 * MIB):
                pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def _median(op: Op) -> float:
    return statistics.median(op.times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big file")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=2000, help="files of 4 KiB in the tree")
    parser.add_argument("--dir", default=None, help="where to put the temporary folder")
    parser.add_argument(
        "--tree-outputs",
        choices=("fresh", "reused"),
        default="fresh",
        help="tree runs write to a new name each run and nothing is deleted until the tree "
        "phase ends (fresh, default), or remove the previous output just before each run "
        "(reused: on ext4 without a journal every new inode then costs ~0.2 ms, see README)",
    )
    args = parser.parse_args()

    missing = [t for t in ("age", "age-keygen", "cp", "sync") if shutil.which(t) is None]
    if missing:
        print(f"missing {', '.join(missing)}: install age with `apt-get install age` (Debian).")
        return 2
    bindir = Path(sys.executable).parent
    modelyo = shutil.which("modelyo", path=str(bindir)) or shutil.which("modelyo")
    if modelyo is None:
        print("the `modelyo` command is not installed: run `pip install -e '.[dev]'` first")
        return 2
    py = sys.executable
    lean = [py, "-m", "modelyo.cli.crypt"]

    tmp = Path(tempfile.mkdtemp(prefix="modelyo-bench-", dir=args.dir))
    try:
        # Our commands run from compiled bytecode, as an installed package does: with
        # PYTHONDONTWRITEBYTECODE (set in some dev shells) and an editable install, every start
        # would compile modelyo's sources again (~0.1 s). The bytecode goes to the temporary
        # folder, never into the source tree; the untimed warm-up runs write it.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        key = tmp / "key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        os.environ["MODELYO_KEY_FILE"] = str(key)
        ident = tmp / "age-identity.txt"
        subprocess.run(["age-keygen", "-o", str(ident)], check=True, capture_output=True)
        recipient = subprocess.run(
            ["age-keygen", "-y", str(ident)], check=True, capture_output=True, text=True
        ).stdout.strip()

        print(
            f"preparing {args.size_mib} MiB of random data and {args.files} files of 4 KiB "
            f"in {tmp} ...",
            flush=True,
        )
        big = tmp / "big"
        _write_random(big, args.size_mib * MIB)
        tree = tmp / "tree"
        tree.mkdir()
        for i in range(args.files):
            (tree / f"f{i:05d}").write_bytes(os.urandom(4096))
        # Inputs for the decrypt runs, made once.
        big_age = tmp / "big.age"
        subprocess.run(["age", "-r", recipient, "-o", str(big_age), str(big)], check=True)
        big_myo = tmp / "big.myo"
        subprocess.run([*lean, "encrypt", "-q", str(big), str(big_myo)], check=True)
        tree_myo = tmp / "tree.myo"
        subprocess.run([*lean, "encrypt", "-q", str(tree), str(tree_myo)], check=True)

        o = tmp / "out"
        nf = "--no-fsync"
        file_ops = [
            Op("cp", ["cp", str(big), str(o)], [o]),
            Op("cp + sync", ["sh", "-c", f"cp '{big}' '{o}' && sync"], [o]),
            Op("age -e", ["age", "-r", recipient, "-o", str(o), str(big)], [o]),
            Op("age -d", ["age", "-d", "-i", str(ident), "-o", str(o), str(big_age)], [o]),
            Op("modelyo encrypt --no-fsync", [modelyo, "encrypt", "-q", nf, str(big), str(o)], [o]),
            Op(
                "modelyo decrypt --no-fsync",
                [modelyo, "decrypt", "-q", nf, str(big_myo), str(o)],
                [o],
            ),
            Op("lean encrypt --no-fsync", [*lean, "encrypt", "-q", nf, str(big), str(o)], [o]),
            Op("lean decrypt --no-fsync", [*lean, "decrypt", "-q", nf, str(big_myo), str(o)], [o]),
            Op("modelyo encrypt (fsync)", [modelyo, "encrypt", "-q", str(big), str(o)], [o]),
            Op("modelyo decrypt (fsync)", [modelyo, "decrypt", "-q", str(big_myo), str(o)], [o]),
            Op(
                "API encrypt_file",
                [py, "-c", _API_SCRIPT, "enc", str(big), str(o), str(key)],
                [o],
                inner_time=True,
            ),
            Op(
                "API decrypt_file",
                [py, "-c", _API_SCRIPT, "dec", str(big_myo), str(o), str(key)],
                [o],
                inner_time=True,
            ),
        ]
        t = tmp / "tout"
        tree_ops = [
            Op("cp -r", ["cp", "-r", str(tree), str(t)], [t]),
            Op("cp -r + sync", ["sh", "-c", f"cp -r '{tree}' '{t}' && sync"], [t]),
            Op(
                "modelyo encrypt --no-fsync", [modelyo, "encrypt", "-q", nf, str(tree), str(t)], [t]
            ),
            Op(
                "modelyo decrypt --no-fsync",
                [modelyo, "decrypt", "-q", nf, str(tree_myo), str(t)],
                [t],
            ),
            Op("lean encrypt --no-fsync", [*lean, "encrypt", "-q", nf, str(tree), str(t)], [t]),
            Op("lean decrypt --no-fsync", [*lean, "decrypt", "-q", nf, str(tree_myo), str(t)], [t]),
            Op("modelyo encrypt (fsync)", [modelyo, "encrypt", "-q", str(tree), str(t)], [t]),
            Op("modelyo decrypt (fsync)", [modelyo, "decrypt", "-q", str(tree_myo), str(t)], [t]),
            Op(
                "API encrypt_tree",
                [py, "-c", _API_SCRIPT, "tenc", str(tree), str(t), str(key)],
                [t],
                inner_time=True,
            ),
            Op(
                "API decrypt_tree",
                [py, "-c", _API_SCRIPT, "tdec", str(tree_myo), str(t), str(key)],
                [t],
                inner_time=True,
            ),
            Op("python startup (modelyo --help)", [modelyo, "--help"], []),
            Op("python startup (lean --help)", [*lean, "--help"], []),
        ]
        for op in file_ops + tree_ops:
            # Python reads its modules with read(), so idle ones get paged out like data:
            # start each Python command once, untimed, so every command runs warm.
            if op.argv[0] == modelyo:
                op.warmup = [modelyo, "--help"]
            elif op.argv[:3] == lean:
                op.warmup = [*lean, "--help"]
            elif op.argv[0] == py:
                op.warmup = [py, "-c", "import modelyo.encryption"]
            # Inputs are read just before each run: warm page cache for every command.
            text = " ".join(op.argv)
            op.inputs = [
                p
                for p in (big, big_age, big_myo, tree, tree_myo)
                if f"{p}'" in text or str(p) in op.argv
            ]
        rng = random.Random(2024)
        for op in tree_ops:
            op.fresh_outputs = args.tree_outputs == "fresh"
        for ops in (file_ops, tree_ops):
            for r in range(args.rounds):
                # A fresh order every round: what ran just before a command affects it
                # (memory, writeback), so no command may always follow the same one.
                order = list(ops)
                rng.shuffle(order)
                for op in order:
                    run(op)
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
            for op in ops:
                for out in op.outputs:
                    _remove(out)
                    for old in out.parent.glob(f"{out.name}-*"):
                        _remove(old)

        # Correctness once: what we decrypt is what we encrypted.
        subprocess.run([*lean, "decrypt", "-q", nf, str(big_myo), str(o)], check=True)
        same = subprocess.run(["cmp", "-s", str(big), str(o)]).returncode == 0
        _remove(o)

        report(file_ops, tree_ops, args, same)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(file_ops: list[Op], tree_ops: list[Op], args: argparse.Namespace, same: bool) -> None:
    """Print the medians and the ratios the issue asks for."""
    size = args.size_mib * MIB
    print(
        f"\n{args.size_mib} MiB file, file to file, {args.rounds} rounds (median, min-max), "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"  {'command':34s} {'median s':>9s} {'min-max s':>13s} {'GB/s':>6s} "
        f"{'peak RSS':>9s} {'CPU':>5s}"
    )
    for op in file_ops:
        m = _median(op)
        print(
            f"  {op.name:34s} {m:9.3f} {min(op.times):6.3f}-{max(op.times):<6.3f} "
            f"{size / m / 1e9:6.2f} {max(op.rss_kib) / 1024:6.1f} MiB "
            f"{statistics.median(op.cpu):5.0%}"
        )
    print(
        f"\ntree of {args.files} files of 4 KiB, {args.rounds} rounds, outputs {args.tree_outputs}"
    )
    print(f"  {'command':34s} {'median s':>9s} {'min-max s':>13s} {'files/s':>8s} {'peak RSS':>9s}")
    for op in tree_ops:
        m = _median(op)
        print(
            f"  {op.name:34s} {m:9.3f} {min(op.times):6.3f}-{max(op.times):<6.3f} "
            f"{args.files / m:8.0f} {max(op.rss_kib) / 1024:6.1f} MiB"
        )

    f = {op.name: op for op in file_ops}
    t = {op.name: op for op in tree_ops}
    rss = {op.name: max(op.rss_kib) / 1024 for op in file_ops + tree_ops}
    rows = []

    def ratio(label: str, base: Op, ours: Op, target: float) -> None:
        r = _median(base) / _median(ours)
        best = min(base.times) / min(ours.times)
        rows.append((label, r, best, target, "PASS" if r >= target else "FAIL"))

    for variant in ("modelyo", "lean"):
        ratio(f"{variant} encrypt vs age -e", f["age -e"], f[f"{variant} encrypt --no-fsync"], 1.5)
        ratio(f"{variant} decrypt vs age -d", f["age -d"], f[f"{variant} decrypt --no-fsync"], 2.0)
        ratio(f"{variant} encrypt vs cp", f["cp"], f[f"{variant} encrypt --no-fsync"], 0.7)
        ratio(f"{variant} decrypt vs cp", f["cp"], f[f"{variant} decrypt --no-fsync"], 0.7)
        ratio(
            f"{variant} tree encrypt vs cp -r (files/s)",
            t["cp -r"],
            t[f"{variant} encrypt --no-fsync"],
            0.8,
        )
        ratio(
            f"{variant} tree decrypt vs cp -r (files/s)",
            t["cp -r"],
            t[f"{variant} decrypt --no-fsync"],
            0.8,
        )
    ratio("API encrypt_file vs cp (no start-up)", f["cp"], f["API encrypt_file"], 0.7)
    ratio("API decrypt_file vs cp (no start-up)", f["cp"], f["API decrypt_file"], 0.7)
    ratio("API encrypt_tree vs cp -r (no start-up)", t["cp -r"], t["API encrypt_tree"], 0.8)
    ratio("API decrypt_tree vs cp -r (no start-up)", t["cp -r"], t["API decrypt_tree"], 0.8)
    ratio("durable encrypt vs cp + sync", f["cp + sync"], f["modelyo encrypt (fsync)"], 0.7)
    ratio("durable decrypt vs cp + sync", f["cp + sync"], f["modelyo decrypt (fsync)"], 0.7)
    ratio(
        "durable tree encrypt vs cp -r + sync", t["cp -r + sync"], t["modelyo encrypt (fsync)"], 0.8
    )
    ratio(
        "durable tree decrypt vs cp -r + sync", t["cp -r + sync"], t["modelyo decrypt (fsync)"], 0.8
    )

    print("\nratios (speed of ours relative to the baseline; higher is better)")
    print(f"  {'':44s} {'median':>7s} {'best':>7s}")
    for label, r, best, target, verdict in rows:
        print(f"  {label:44s} {r:6.2f}x {best:6.2f}x  target >= {target:.1f}x  {verdict} (median)")
    ours_rss = max(v for k, v in rss.items() if k.startswith(("modelyo", "lean", "API")))
    lean_rss = max(v for k, v in rss.items() if k.startswith("lean"))
    print(
        f"\npeak RSS of our processes: {ours_rss:.1f} MiB (lean entry {lean_rss:.1f} MiB); "
        f"target < 64 MiB: {'PASS' if ours_rss < 64 else 'FAIL'}"
    )
    print(f"round trip of the big file identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())

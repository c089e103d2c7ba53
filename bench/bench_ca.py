"""CA benchmark: key releases per second over mutual TLS, and the time of a full attestation.

Run: `.venv/bin/python bench/bench_ca.py [--releases N] [--rounds N]`

The machine is shared and noisy, so every number comes with a reference measured in the same
run, interleaved: a plain HTTPS request to the same CA over the same kind of connection. The
ratios are what to compare across runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from modelyo import dev
from modelyo.attest import attest_ca
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.verify import TrustRoot
from modelyo.client.ca import CaClient
from modelyo.client.tls import first_contact_context, pinned_context
from modelyo.measure import measure
from modelyo.workspace import CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY, Endpoint, Workspace


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else float("inf")


def bench_releases(url: str, ws: Workspace, count: int) -> tuple[float, float, float, float]:
    """(mTLS releases/s, reference GETs/s) on one kept-alive connection; then per-connection."""
    root = ws.path(CA_CERT).read_bytes()
    cert, key = ws.path(CA_CLIENT_CERT), ws.path(CA_CLIENT_KEY)
    with CaClient(url, root, client_cert=cert, client_key=key) as client:
        client.release_key("default")  # warm up
        with httpx.Client(base_url=url, verify=pinned_context(root)) as plain:
            plain.get("/docs")
            t0 = time.perf_counter()
            for _ in range(count):
                client.release_key("default")
            t1 = time.perf_counter()
            for _ in range(count):
                plain.get("/docs")
            t2 = time.perf_counter()
    kept = (_rate(count, t1 - t0), _rate(count, t2 - t1))

    fresh = max(count // 10, 10)
    t0 = time.perf_counter()
    for _ in range(fresh):
        with CaClient(url, root, client_cert=cert, client_key=key) as client:
            client.release_key("default")
    t1 = time.perf_counter()
    for _ in range(fresh):
        with httpx.Client(base_url=url, verify=pinned_context(root)) as plain:
            plain.get("/docs")
    t2 = time.perf_counter()
    return (*kept, _rate(fresh, t1 - t0), _rate(fresh, t2 - t1))


def bench_attest(rounds: int) -> tuple[float, float]:
    """Median seconds of a full `attest` (fresh CA each round) and of one first-contact GET."""
    attest_times, reference = [], []
    policy = SgxPolicy(allowed_mrenclave=[measure("ca").hex])
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            stack = dev.up(Path(tmp) / "dev", ca_port=0)
            try:
                assert stack.ca is not None
                ws_dir = Path(tmp) / "ws"
                ws_dir.mkdir()
                trust = TrustRoot.simulation(Path(stack.sim_dir))
                t0 = time.perf_counter()
                with httpx.Client(verify=first_contact_context()) as plain:
                    plain.get(stack.ca.url + "/docs")
                t1 = time.perf_counter()
                attest_ca(
                    Workspace(ws_dir),
                    Endpoint(stack.ca.url, "bench"),
                    trust=trust,
                    policy=policy,
                    expected_from="bench",
                )
                t2 = time.perf_counter()
                reference.append(t1 - t0)
                attest_times.append(t2 - t1)
            finally:
                dev.down(Path(tmp) / "dev")
    return statistics.median(attest_times), statistics.median(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--releases", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    attest_s, ref_s = bench_attest(args.rounds)
    print(
        f"full `modelyo attest` (step 1, SIMULATED): median {attest_s * 1000:.0f} ms; "
        f"reference first-contact HTTPS GET {ref_s * 1000:.1f} ms; "
        f"ratio {attest_s / ref_s:.1f}x"
    )

    with tempfile.TemporaryDirectory() as tmp:
        stack = dev.up(Path(tmp) / "dev", ca_port=0)
        try:
            assert stack.ca is not None
            ws_dir = Path(tmp) / "ws"
            ws_dir.mkdir()
            ws = Workspace(ws_dir)
            attest_ca(
                ws,
                Endpoint(stack.ca.url, "bench"),
                trust=TrustRoot.simulation(Path(stack.sim_dir)),
                policy=SgxPolicy(allowed_mrenclave=[measure("ca").hex]),
                expected_from="bench",
            )
            kept, kept_ref, fresh, fresh_ref = bench_releases(stack.ca.url, ws, args.releases)
        finally:
            dev.down(Path(tmp) / "dev")
    print(
        f"key releases over mTLS, one kept-alive connection: {kept:.0f}/s; "
        f"reference HTTPS GET /docs: {kept_ref:.0f}/s; ratio {kept / kept_ref:.2f}"
    )
    print(
        f"key releases over mTLS, new connection each: {fresh:.0f}/s; "
        f"reference HTTPS GET /docs with a new connection each: {fresh_ref:.0f}/s; "
        f"ratio {fresh / fresh_ref:.2f}"
    )


if __name__ == "__main__":
    main()

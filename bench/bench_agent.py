"""Agent benchmark: `modelyo docker load` against `docker load` of the same tarball, and
create+run+wait of a trivial container through the agent against `docker run`.

Run: `.venv/bin/python bench/bench_agent.py [--rounds N] [--mib N]`

Both sides use this machine's Docker engine, interleaved round by round, so the ratios are
the agent's overhead (mutual TLS, streaming, validation, bookkeeping) and not the machine's mood.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from modelyo import dev
from modelyo.api.agent import ContainerSpec
from modelyo.attest import attest_ca, attest_tdx, expected_ca_policy, expected_tdx_policy
from modelyo.attestation.verify import TrustRoot
from modelyo.client.agent import AgentClient, file_chunks
from modelyo.images.base import DEFAULT_TAG
from modelyo.workspace import Endpoint, Workspace

TAG = "modelyo-bench-load:1"


def build_tarball(client: docker.DockerClient, workdir: Path, mib: int) -> Path:
    """An image with one unique layer of `mib` MiB on top of the base image, saved."""
    context = workdir / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {DEFAULT_TAG}\nRUN head -c {mib}M /dev/urandom > /blob\n"
    )
    image, _ = client.images.build(path=str(context), tag=TAG, network_mode="none", rm=True)
    tarball = workdir / "image.tar"
    with tarball.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)
    client.images.remove(TAG, force=True)
    return tarball


def _drop(client: docker.DockerClient) -> None:
    with contextlib.suppress(ImageNotFound):
        client.images.remove(TAG, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=200, help="size of the unique layer")
    args = parser.parse_args()
    engine = docker.from_env(timeout=600)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        stack = dev.up(tmp / "dev", ca_port=0, agent_port=0)
        try:
            assert stack.ca is not None and stack.agent is not None
            ws = Workspace(tmp / "ws")
            ws.root.mkdir()
            trust = TrustRoot.simulation(Path(stack.sim_dir))
            ca_policy, _ = expected_ca_policy(policy_file=None, simulation=True)
            tdx_policy, _ = expected_tdx_policy(policy_file=None, simulation=True)
            attest_ca(
                ws,
                Endpoint(stack.ca.url, "bench"),
                trust=trust,
                policy=ca_policy,
                expected_from="bench",
                sim_dir=Path(stack.sim_dir),
            )
            attest_tdx(
                ws,
                Endpoint(stack.agent.url, "bench"),
                trust=trust,
                policy=tdx_policy,
                expected_from="bench",
                sim_dir=Path(stack.sim_dir),
            )
            tarball = build_tarball(engine, tmp, args.mib)
            size = tarball.stat().st_size

            ours, theirs = [], []
            with AgentClient.for_owner(ws) as agent:
                for _ in range(args.rounds):
                    _drop(engine)
                    t0 = time.perf_counter()
                    agent.load_image(file_chunks(tarball))
                    ours.append(time.perf_counter() - t0)
                    _drop(engine)
                    t0 = time.perf_counter()
                    with tarball.open("rb") as handle:
                        engine.images.load(handle)
                    theirs.append(time.perf_counter() - t0)
                load_ours, load_ref = statistics.median(ours), statistics.median(theirs)
                print(
                    f"image load, {size / 2**20:.0f} MiB tarball: modelyo docker load "
                    f"{load_ours:.2f} s, docker load {load_ref:.2f} s; "
                    f"ratio {load_ours / load_ref:.2f}x"
                )

                agent.load_image(file_chunks(tarball))  # the agent serves images it loaded
                ours, theirs = [], []
                for i in range(args.rounds * 3):
                    name = f"bench-{i}"
                    t0 = time.perf_counter()
                    agent.create(ContainerSpec(image=TAG, name=name, command=["true"]))
                    agent.start(name)
                    agent.wait(name, timeout=60)
                    ours.append(time.perf_counter() - t0)
                    agent.delete(name)
                    t0 = time.perf_counter()
                    engine.containers.run(TAG, ["true"], remove=True, network_disabled=True)
                    theirs.append(time.perf_counter() - t0)
            run_ours, run_ref = statistics.median(ours), statistics.median(theirs)
            print(
                f"trivial container: create+run+wait via the agent {run_ours * 1000:.0f} ms, "
                f"docker run {run_ref * 1000:.0f} ms; ratio {run_ours / run_ref:.2f}x"
            )
        finally:
            dev.down(tmp / "dev")
            _drop(engine)


if __name__ == "__main__":
    main()

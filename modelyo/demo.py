"""`make demo`: the main job end to end on the embedded simulated platform.

Each step prints what it does and what it found. It grows with the product: today it shows the
attestation core (measurements, RA-TLS, verification and its refusals, real Intel quotes) and
the job base image.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule

from modelyo.attestation import binding, ratls
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.quote import parse_quote
from modelyo.attestation.verify import TrustRoot, verify_quote
from modelyo.cli.render import render_verdict
from modelyo.measure import measure
from modelyo.tee.sim import SimulatedPlatform

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "dcap"


def _step(console: Console, title: str) -> None:
    console.print(Rule(f"[bold]{title}"))


def run(console: Console, state_dir: Path) -> bool:
    """Run every step; return True when each one gave the expected result."""
    ok = True
    _step(console, "1. Measure the CA's code (what a policy pins)")
    ca = measure("ca")
    console.print(f"MRENCLAVE {ca.hex}  ({ca.file_count} files)", soft_wrap=True)

    _step(console, "2. A SIMULATED SGX platform, created on first use")
    platform = SimulatedPlatform(state_dir)
    enclave = platform.sgx_enclave(mr_enclave=ca.value, mr_signer=bytes(32))
    console.print(f"platform state: {platform.state_dir}")
    console.print(f"quote provider: {enclave.name}")

    _step(console, "3. An RA-TLS certificate: a fresh TLS key bound into a quote")
    key = ratls.new_tls_key()
    cert = ratls.create_certificate(enclave, key, common_name="Modelyo CA (demo)")
    quote = parse_quote(ratls.quote_from_certificate(cert) or b"")
    spki = binding.spki_der(key.public_key())
    console.print(f"quote: SGX v{quote.version}, {len(quote.raw)} bytes")
    console.print(
        f"REPORTDATA = SHA-512('modelyo-ratls-v1:' || SPKI) = {quote.report_data.hex()[:32]}…"
    )
    console.print(f"binds the certificate's key: {binding.matches(quote.report_data, spki)}")

    _step(console, "4. Verify it under the simulation root, pinning the measured MRENCLAVE")
    sim_root = TrustRoot("simulation", platform.root_certificate_der(), simulated=True)
    collateral = platform.collateral("sgx")
    policy = SgxPolicy(allowed_mrenclave=[ca.hex])
    verdict = ratls.verify_certificate(
        cert, collateral, root=sim_root, policy=policy, policy_name="ca"
    )
    render_verdict(console, verdict)
    ok &= verdict.accepted

    _step(console, "5. The refusals a user relies on")
    refusals = {
        "under the Intel root": ratls.verify_certificate(
            cert, collateral, root=TrustRoot.intel(), policy=policy, policy_name="ca"
        ),
        "one flipped bit in MRENCLAVE": verify_quote(
            _flip(quote.raw, 112), collateral, root=sim_root, policy=policy, policy_name="ca"
        ),
        "a fresh challenge answered for another nonce": verify_quote(
            enclave.get_quote(binding.report_data(spki, binding.new_nonce())),
            collateral,
            root=sim_root,
            policy=policy,
            policy_name="ca",
            expected_report_data=binding.report_data(spki, binding.new_nonce()),
        ),
        "another CA build": verify_quote(
            quote.raw,
            collateral,
            root=sim_root,
            policy=SgxPolicy(allowed_mrenclave=["00" * 32]),
            policy_name="ca",
        ),
    }
    for what, refused in refusals.items():
        mark = "[green]refused[/]" if not refused.accepted else "[red]ACCEPTED (wrong!)[/]"
        detail = refused.failures[0].detail if refused.failures else ""
        console.print(f"{mark} {what}: {escape(detail)}")
        ok &= not refused.accepted

    _step(console, "6. Real Intel quotes (../shared/vectors/dcap) through the same verifier")
    if VECTORS.is_dir():
        raw = (VECTORS / "tdx_quote").read_bytes()
        real = Collateral.from_file(VECTORS / "tdx_quote_collateral.json")
        at_issue = verify_quote(raw, real, root=TrustRoot.intel(), now=1750331763)
        today = verify_quote(raw, real, root=TrustRoot.intel())
        console.print(
            f"TDX quote at its collateral's time: accepted={at_issue.accepted}, "
            f"status {at_issue.status}"
        )
        console.print(f"TDX quote today: accepted={today.accepted}: {escape(today.reason())}")
        ok &= at_issue.accepted and not today.accepted
    else:
        console.print(f"(skipped: {VECTORS} not found)")

    _step(console, "7. The job base image (built from Debian packages, no registry)")
    ok &= _show_base_image(console)
    return ok


def _flip(raw: bytes, offset: int) -> bytes:
    data = bytearray(raw)
    data[offset] ^= 0x01
    return bytes(data)


def _show_base_image(console: Console) -> bool:
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound

        from modelyo.images.base import DEFAULT_TAG
    except ImportError:
        console.print("(skipped: the docker SDK is not installed)")
        return True
    try:
        client = docker.from_env()
        client.images.get(DEFAULT_TAG)
        out = client.containers.run(
            DEFAULT_TAG,
            [
                "python",
                "-c",
                "import sys, pandas, pyarrow, modelyo; "
                "print(sys.version.split()[0], pandas.__version__, pyarrow.__version__, "
                "modelyo.__version__)",
            ],
            network_disabled=True,
            remove=True,
        )
    except ImageNotFound:
        console.print(f"[red]{DEFAULT_TAG} is missing: run `modelyo image build-base`[/]")
        return False
    except DockerException as exc:
        console.print(f"[red]Docker engine not reachable: {exc}[/]")
        return False
    python, pandas, pyarrow, version = out.decode().split()
    console.print(
        f"{DEFAULT_TAG}: Python {python}, pandas {pandas}, pyarrow {pyarrow}, "
        f"modelyo {version}, run with no network"
    )
    return True


def main() -> int:
    console = Console()
    console.print("[bold yellow]Modelyo demo on the SIMULATED platform (no SGX/TDX here)[/]")
    with tempfile.TemporaryDirectory(prefix="modelyo-demo-") as tmp:
        ok = run(console, Path(tmp) / "sim")
    console.print(Rule())
    console.print("[bold green]demo complete[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the main job end to end on the embedded simulated platform.

Each step prints what it does, then runs the real command or API a user would, in a temporary
directory, against a local stack started for the demo. It grows with the product.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule

from modelyo import dev
from modelyo.attestation import binding
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.verify import TrustRoot, verify_quote
from modelyo.cli.main import main as modelyo
from modelyo.client import ca as ca_client
from modelyo.errors import AttestationError
from modelyo.measure import measure
from modelyo.workspace import Workspace

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "dcap"

# The document's typical job: take an encrypted file from untrusted storage (/data/in), decrypt
# it through /modelyo/dec_in -> dec_out, process it, encrypt the result through
# /modelyo/enc_in -> enc_out, and put it back (/data/out).
JOB_SCRIPT = """\
from pathlib import Path

from modelyo import incontainer

plain = incontainer.decrypt("/data/in/numbers.csv")
numbers = [int(x) for x in plain.read_text().split()]
total = Path("/tmp/sum.txt")
total.write_text(f"sum={sum(numbers)} count={len(numbers)}\\n")
encrypted = incontainer.encrypt(total)
Path("/data/out").mkdir(parents=True, exist_ok=True)
Path("/data/out/sum.txt").write_bytes(encrypted.read_bytes())
print("job done: result encrypted", flush=True)
"""


def build_job_image(client: Any, tag: str, workdir: Path) -> Path:
    """`docker build` the job FROM the base image and `docker save` it; return the tarball.

    The local image is removed again, so the VM's engine gets it only through the upload.
    """
    from modelyo.images.base import DEFAULT_TAG

    context = workdir / "image"
    context.mkdir(parents=True)
    (context / "job.py").write_text(JOB_SCRIPT)
    (context / "Dockerfile").write_text(
        f"FROM {DEFAULT_TAG}\nCOPY job.py /job.py\nRUN mkdir -p /data/in /data/out\n"
        'CMD ["python", "/job.py"]\n'
    )
    image, _ = client.images.build(path=str(context), tag=tag, network_mode="none", rm=True)
    tarball = workdir / "my_image.tar"
    with tarball.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)
    client.images.remove(tag)
    return tarball


class Demo:
    """Runs numbered steps and remembers whether each gave the expected result."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.number = 0
        self.ok = True

    def step(self, title: str) -> None:
        self.number += 1
        self.console.print(Rule(f"[bold]{self.number}. {title}"))

    def command(self, *args: str, expect: int = 0) -> None:
        """Run `modelyo ARGS` as a user would, showing the command line."""
        self.console.print(f"[bold cyan]$ modelyo {' '.join(args)}[/]", highlight=False)
        code = modelyo(list(args))
        if code != expect:
            self.console.print(f"[red]exit code {code}, expected {expect}[/]")
            self.ok = False

    def expect(self, what: str, passed: bool, detail: str = "") -> None:
        mark = "[green]as expected[/]" if passed else "[red]UNEXPECTED[/]"
        self.console.print(f"{mark} {what}" + (f": {escape(detail)}" if detail else ""))
        self.ok &= passed


def _refused(check: Callable[[], object]) -> tuple[bool, str]:
    try:
        check()
    except AttestationError as exc:
        return True, str(exc)
    return False, "accepted"


def run(demo: Demo, tmp: Path) -> None:
    """Every step, in order."""
    os.environ["MODELYO_DEV_DIR"] = str(tmp / "dev")
    os.environ.pop("MODELYO_CA_URL", None)
    project = tmp / "project"
    project.mkdir()
    os.chdir(project)

    demo.step("What the CA must be: measure its code (the value a policy pins)")
    demo.command("measure", "ca")

    demo.step("Start the local stack: the CA and the TDX agent on the SIMULATED platform")
    demo.command("dev", "up", "--ca-port", "0", "--agent-port", "0")
    stack = dev.read_stack()
    assert stack is not None and stack.ca is not None

    demo.step("Attestation: the CA (step 1), then the TDX VM and its GPU (step 2); ownership")
    demo.command("attest")
    files = sorted(p.name for p in project.iterdir())
    key_mode = oct((project / "ca_client.key").stat().st_mode & 0o777)
    demo.console.print(f"files here: {', '.join(files)}; ca_client.key mode {key_mode}")
    demo.expect("the key is private", key_mode == "0o600")

    demo.step("Running it again as the owner changes nothing")
    demo.command("attest")

    demo.step("Someone else tries to take the CA: refused, and nothing is written for them")
    intruder = tmp / "intruder"
    intruder.mkdir()
    demo.command("attest", "-C", str(intruder), expect=1)
    demo.expect("the intruder's directory stays empty", not any(intruder.iterdir()))

    demo.step("What a machine in the middle could try: each is refused")
    trust = TrustRoot.simulation(Path(stack.sim_dir))
    policy = SgxPolicy(allowed_mrenclave=[measure("ca").hex])
    nonce = binding.new_nonce()
    body, presented = ca_client.fetch_attestation(stack.ca.url, nonce)

    def check(body=body, nonce=nonce, policy=policy, trust=trust):  # type: ignore[no-untyped-def]
        return ca_client.check_attestation(
            stack.ca.url, body, presented, nonce, trust=trust, policy=policy
        )

    quote = bytearray(base64.b64decode(body.quote))
    quote[50] ^= 1  # CPUSVN: covered by the signature, pinned by nothing else
    tampered = body.model_copy(update={"quote": base64.b64encode(bytes(quote)).decode()})
    for what, attempt in {
        "a quote with one flipped bit": lambda: check(body=tampered),
        "an attestation answering another nonce": lambda: check(nonce=binding.new_nonce()),
        "a CA of another build": lambda: check(policy=SgxPolicy(allowed_mrenclave=["00" * 32])),
        "the simulated CA judged under Intel's root": lambda: check(trust=TrustRoot.intel()),
    }.items():
        refused, reason = _refused(attempt)
        demo.expect(f"refused {what}", refused, reason)

    demo.step("The owner at work: VMs, a key, a rotation, the signed audit log")
    demo.command("ca", "vms")
    with ca_client.CaClient.for_owner(Workspace(project)) as client:
        released = client.release_key("default")
    demo.console.print(f"released key 'default' version {released.version} (32 bytes, not shown)")
    demo.command("ca", "rotate")
    demo.command("audit", "verify")

    demo.step("Encrypt a folder for untrusted storage (keys from the CA)")
    (project / "my_plain").mkdir()
    (project / "my_plain" / "numbers.csv").write_text("1\n2\n3\n4\n")
    demo.command("encrypt", "my_plain/", "my_encrypted/")
    storage = tmp / "untrusted-storage"
    (storage / "in").mkdir(parents=True)
    shutil.copy(project / "my_encrypted" / "numbers.csv", storage / "in" / "numbers.csv")
    demo.expect(
        "no plaintext in storage", b"1\n2" not in (storage / "in" / "numbers.csv").read_bytes()
    )

    demo.step("A job in the attested VM: docker build/save here, load, create, run, wait")
    import docker

    tarball = build_job_image(docker.from_env(), "my_image:latest", tmp)
    demo.command("docker", "load", "-f", str(tarball))
    demo.command("docker", "create", "-i", "my_image:latest", "-n", "my_container")
    demo.command("docker", "cp", str(storage / "in" / "numbers.csv"), "my_container:/data/in/")
    demo.command("docker", "run", "my_container")
    demo.command("docker", "wait", "--timeout", "120", "my_container")
    demo.command("docker", "logs", "my_container")
    (storage / "out").mkdir()
    demo.command("docker", "cp", "my_container:/data/out/sum.txt", str(storage / "out"))
    demo.command("docker", "stop", "my_container")
    demo.command("docker", "delete", "my_container")

    demo.step("Decrypt the result locally")
    demo.command("decrypt", str(storage / "out"), "my_result/")
    result = (project / "my_result" / "sum.txt").read_text()
    demo.expect("the job's result", result == "sum=10 count=4\n", result.strip())

    demo.step("Jupyter: the quickstart notebook, run by papermill, its output stored encrypted")
    _run_quickstart(demo, project)

    demo.step("Real Intel quotes (../shared/vectors/dcap) through the same verifier")
    if VECTORS.is_dir():
        raw = (VECTORS / "tdx_quote").read_bytes()
        real = Collateral.from_file(VECTORS / "tdx_quote_collateral.json")
        at_issue = verify_quote(raw, real, root=TrustRoot.intel(), now=1750331763)
        today = verify_quote(raw, real, root=TrustRoot.intel())
        demo.expect(f"accepted at its collateral's time ({at_issue.status})", at_issue.accepted)
        demo.expect("refused today", not today.accepted, today.reason())
    else:
        demo.console.print(f"(skipped: {VECTORS} not found)")

    demo.step("The job base image (built from Debian packages, no registry)")
    _show_base_image(demo)

    demo.step("Stop the local stack (its state is kept)")
    demo.command("dev", "down")


def notebooks_dir() -> Path:
    """The repository's notebooks/ folder, beside the modelyo package's source."""
    return Path(__file__).resolve().parents[1] / "notebooks"


def _cell_lines(cell: Any, limit: int = 5) -> list[str]:
    """The lines a reader looks at in a cell's outputs: streams, plain-text results, errors."""
    lines: list[str] = []
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            lines += output["text"].splitlines()
        elif kind in ("execute_result", "display_data"):
            text = output.get("data", {}).get("text/plain", "")
            lines += ("".join(text) if isinstance(text, list) else text).splitlines()
        elif kind == "error":
            lines.append(f"{output['ename']}: {output['evalue']}")
    # Rules and banners' borders say nothing on their own.
    lines = [line for line in lines if line.strip().strip("!-=─━ ")]
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
    return lines


def _run_quickstart(demo: Demo, project: Path) -> None:
    """Execute notebooks/quickstart.ipynb in this workspace and show what each cell did."""
    source = notebooks_dir() / "quickstart.ipynb"
    if not source.is_file():
        demo.console.print(
            f"[yellow](skipped: the quickstart notebook is not at {escape(str(source))}; the "
            "notebooks ship with the repository, not the package: run `make demo` in a checkout)[/]"
        )
        return
    try:
        import nbformat
        import papermill

        from modelyo_jupyter.kernels import PrivateKernelManager
        from modelyo_jupyter.papermill_io import EncryptedNotebookHandler
    except ImportError as exc:
        demo.expect("the jupyter extra is installed", False, f"{exc}; pip install 'modelyo[dev]'")
        return
    output = "modelyo+enc://quickstart-out.ipynb"
    shown = source.relative_to(source.parents[1])
    demo.console.print(f"[bold cyan]$ papermill {shown} {output}[/]", highlight=False)
    error = ""
    try:
        papermill.execute_notebook(
            str(source),
            output,
            cwd=str(project),
            kernel_name="python3",
            # The kernel holds the decrypted frame: Unix sockets only this user can open.
            kernel_manager_class=PrivateKernelManager,
            progress_bar=False,
            log_output=False,
        )
    except papermill.PapermillExecutionError as exc:
        error = f"cell {exc.cell_index}: {exc.ename}: {exc.evalue}"
    except Exception as exc:  # the notebook's kernel, or its output could not be written
        demo.expect("the quickstart ran", False, f"{type(exc).__name__}: {exc}")
        return
    stored = (project / "quickstart-out.ipynb").read_bytes()
    nb = nbformat.reads(EncryptedNotebookHandler.read(output), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        first = cell.source.splitlines()[0] if cell.source else ""
        demo.console.print(f"[bold]In \\[{cell.execution_count or ' '}]:[/] {escape(first)}")
        for line in _cell_lines(cell):
            demo.console.print(
                f"    {escape(line)}", highlight=False, no_wrap=True, overflow="ellipsis"
            )
    demo.expect("every cell ran without an error", not error, error)
    demo.expect(
        "the executed notebook is stored encrypted (quickstart-out.ipynb)",
        b"nbformat" not in stored,
    )


def _show_base_image(demo: Demo) -> None:
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound

        from modelyo.images.base import DEFAULT_TAG
    except ImportError:
        demo.console.print("(skipped: the docker SDK is not installed)")
        return
    try:
        client = docker.from_env()
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
        demo.expect(f"{DEFAULT_TAG} exists", False, "run `modelyo image build-base`")
        return
    except DockerException as exc:
        demo.expect("the Docker engine answers", False, str(exc))
        return
    python, pandas, pyarrow, version = out.decode().split()
    demo.console.print(
        f"{DEFAULT_TAG}: Python {python}, pandas {pandas}, pyarrow {pyarrow}, "
        f"modelyo {version}, run with no network"
    )


def _remove_image(tag: str) -> None:
    try:
        import docker

        docker.from_env().images.remove(tag, force=True)
    except Exception:  # noqa: S110 - best-effort cleanup of the demo's own image
        pass


def main() -> int:
    console = Console()
    console.print("[bold yellow]Modelyo demo on the SIMULATED platform (no SGX/TDX here)[/]")
    demo = Demo(console)
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="modelyo-demo-") as tmp:
        try:
            run(demo, Path(tmp))
        finally:
            dev.down()
            os.chdir(cwd)
            _remove_image("my_image:latest")
    console.print(Rule())
    console.print("[bold green]demo complete[/]" if demo.ok else "[bold red]demo FAILED[/]")
    return 0 if demo.ok else 1


if __name__ == "__main__":
    sys.exit(main())

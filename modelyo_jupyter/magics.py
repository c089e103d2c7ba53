"""IPython magics: `%modelyo attest|status|ps|logs|help` and `%%modelyo_run`.

Everything acts on the notebook's working directory, the same workspace the `modelyo` command
uses (`modelyo attest` there and `%modelyo attest` in a notebook started there are the same
thing). Errors from Modelyo fail the cell with the tool's message and no Python traceback of
ours (`_render_traceback_`, the hook ipyparallel uses for remote errors); a remote exception
shows the traceback from the attested VM instead.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import keyword
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import (
    Magics,
    cell_magic,
    line_magic,
    magics_class,
    needs_local_scope,
    no_var_expand,
)
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)
from IPython.display import display

from modelyo.cli.render import SIMULATED_BANNER
from modelyo.errors import (
    JobTimeoutError,
    ModelyoError,
    RemoteExecutionError,
)
from modelyo.workspace import (
    ATTEST_HINT,
    CA_CERT,
    CA_CLIENT_CERT,
    TDX_CERT,
    TDX_CLIENT_CERT,
    Endpoint,
    Workspace,
)
from modelyo_jupyter.widgets import (
    Card,
    JobProgress,
    ProgressMode,
    Row,
    Section,
    card_display,
    have_widgets,
)

if TYPE_CHECKING:
    from modelyo.api.agent import ContainerInfo, GpuReport
    from modelyo.attest import AttestOutcome
    from modelyo.jobs import JobSession

_ANSI_RED, _ANSI_BOLD, _ANSI_RESET = "\x1b[0;31m", "\x1b[1m", "\x1b[0m"


# --- errors: the tool's message, not our traceback -----------------------------------------------


def error_lines(exc: BaseException) -> list[str]:
    """What the cell shows for a Modelyo error: a remote traceback when there is one, then
    `Name: message` (ANSI red, as IPython colours error names)."""
    name = f"{_ANSI_RED}{type(exc).__name__}{_ANSI_RESET}"
    if isinstance(exc, RemoteExecutionError):
        text = "".join(
            line if line.endswith("\n") else line + "\n" for line in exc.remote_traceback
        )
        lines = [
            f"{_ANSI_BOLD}Remote traceback (the cell ran in the attested TDX VM):{_ANSI_RESET}"
        ]
        lines += text.rstrip("\n").split("\n") if text.strip() else []
        lines.append(f"{name}: {exc.ename}: {exc.evalue}")
        return lines
    lines = [f"{name}: {exc}"]
    if isinstance(exc, JobTimeoutError) and "stopped" not in str(exc):
        lines.append("The job's container was stopped and removed.")
    return lines


E = TypeVar("E", bound=BaseException)


def short_error(exc: E) -> E:
    """Make IPython show `exc` as `error_lines` instead of a traceback through our code.

    The class is kept (ename in the kernel's reply, `except` clauses); IPython asks any
    exception with a `_render_traceback_` for its lines (`InteractiveShell.showtraceback`).
    """
    lines = error_lines(exc)
    exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
    return exc


@contextmanager
def shown_as_cell_error() -> Iterator[None]:
    try:
        yield
    except ModelyoError as exc:
        short_error(exc)
        raise


# --- %modelyo attest ------------------------------------------------------------------------------


def _cert_info(workspace: Workspace, name: str) -> tuple[str, str] | None:
    """(SHA-256 fingerprint, subject common name) of the first certificate in a workspace
    file; None when the file is missing."""
    from cryptography.x509.oid import NameOID

    from modelyo import pki

    path = workspace.path(name)
    if not path.is_file():
        return None
    cert = pki.load_certs(path.read_bytes())[0]
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return pki.fingerprint(cert), str(names[0].value) if names else ""


def fingerprint_rows(workspace: Workspace) -> tuple[Row, ...]:
    rows = []
    for name in (CA_CERT, CA_CLIENT_CERT, TDX_CERT, TDX_CLIENT_CERT):
        info = _cert_info(workspace, name)
        if info is not None:
            rows.append(Row(name, info[0]))
    return tuple(rows)


def _tcb_row(status: str | None, advisories: list[str]) -> Row:
    shown = status or "unknown"
    if advisories:
        shown += f" (advisories: {', '.join(advisories)})"
    return Row("TCB status", shown, "ok" if status == "UpToDate" else "warn")


def gpu_rows(report: GpuReport, *, verified_here: bool) -> tuple[tuple[Row, ...], str]:
    """One row per GPU with its evidence status; the note when there is none."""
    if not report.gpus:
        return (), f"none ({report.detail or 'the VM reports no GPU'})"
    rows = []
    for g in report.gpus:
        if verified_here:
            evidence = (
                "evidence verified" if g.verified else "evidence REFUSED: " + "; ".join(g.problems)
            )
        else:
            evidence = "evidence is verified by `%modelyo attest`"
        sim = ", SIMULATED" if g.simulated else ""
        rows.append(
            Row(
                f"GPU {g.index}",
                f"{g.name} ({g.arch}), CC mode {g.cc_mode}, driver {g.driver_version}, VBIOS "
                f"{g.vbios_version}: {evidence}{sim}",
                "ok" if (g.verified or not verified_here) and g.cc_mode == "on" else "warn",
            )
        )
    return tuple(rows), ""


def attestation_card(outcome: AttestOutcome) -> Card:
    """The card `%modelyo attest` shows (pure: from the onboarding results and the files)."""
    ca, tdx = outcome.ca, outcome.tdx
    m = ca.verdict.measurements
    ca_rows = [
        Row("URL", f"{ca.url} ({ca.url_source})"),
        _tcb_row(ca.verdict.status, ca.verdict.advisories),
        Row("MRENCLAVE", m.get("mrenclave", "?")),
        Row("MRSIGNER", m.get("mrsigner", "?")),
        Row("ISV prod id / SVN", f"{m.get('isv_prod_id', '?')} / {m.get('isv_svn', '?')}"),
        Row("expected from", ca.expected_from),
        Row("ownership", _ownership(ca.ownership), "ok"),
    ]
    sections = [Section("CA (SGX enclave, key service)", tuple(ca_rows))]
    if tdx is None:
        sections.append(
            Section(
                "TDX VM",
                note="no endpoint configured (pass --tdx URL, set MODELYO_TDX_URL, or run "
                "`modelyo dev up`); step 2 skipped",
            )
        )
    else:
        t = tdx.verdict.measurements
        rows = [
            Row("URL", f"{tdx.url} ({tdx.url_source})"),
            Row("VM id", tdx.vm_id),
            _tcb_row(tdx.verdict.status, tdx.verdict.advisories),
            Row("MRTD", t.get("mrtd", "?")),
        ]
        rows += [
            Row(name.upper(), t[name]) for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3") if name in t
        ]
        rows += [
            Row("expected from", tdx.expected_from),
            Row("ownership", _ownership(tdx.ownership), "ok"),
        ]
        sections.append(Section("TDX VM (agent)", tuple(rows)))
        g_rows, g_note = gpu_rows(tdx.gpus, verified_here=True)
        sections.append(Section("GPUs", g_rows, g_note))
    sections.append(
        Section("Certificates in this directory (SHA-256)", fingerprint_rows(outcome.workspace))
    )
    written = [*ca.files, *(tdx.files if tdx else [])]
    footer = f"Wrote {', '.join(written)} (keys with mode 0600)." if written else ""
    return Card(
        title=f"Modelyo attestation: {outcome.workspace.root}",
        sections=tuple(sections),
        banner=SIMULATED_BANNER if outcome.simulated else "",
        footer=footer,
    )


def _ownership(value: str) -> str:
    return {
        "claimed": "claimed: this directory holds the owner's keys",
        "already owner": "already the owner (nothing changed)",
    }.get(value, value)


# --- %modelyo status ----------------------------------------------------------------------------


def attested(workspace: Workspace) -> bool:
    """Whether the workspace holds all six files `modelyo attest` writes."""
    return workspace.attested


def require_attested(workspace: Workspace) -> None:
    workspace.require(needed_for="this command")


def _discovered(service: str, workspace: Workspace) -> Endpoint | None:
    from modelyo import dev
    from modelyo.workspace import resolve_endpoint

    return resolve_endpoint(service, None, workspace, dev_stack=dev.running_endpoints())


def status_card(workspace: Workspace, gpus: GpuReport | None, gpu_error: str = "") -> Card:
    """The card `%modelyo status` shows (pure apart from reading the workspace's files)."""
    config = workspace.config()
    ca_done = workspace.ca_owner
    tdx_done = attested(workspace)
    if tdx_done:
        state = Row("state", "attested: the CA and the TDX VM are yours", "ok")
    elif ca_done:
        state = Row("state", f"CA attested, TDX VM not yet: {ATTEST_HINT}", "warn")
    else:
        state = Row("state", f"not attested: {ATTEST_HINT}", "warn")
    sections = [Section("Workspace", (Row("directory", str(workspace.root)), state))]

    rows = []
    for service, label, recorded in (
        ("ca", "CA", config.ca_url),
        ("tdx", "TDX VM", config.tdx_url),
    ):
        if recorded and (tdx_done if service == "tdx" else ca_done):
            rows.append(Row(label, f"{recorded} (attested)"))
            continue
        found = _discovered(service, workspace)
        rows.append(
            Row(
                label,
                f"{found.url} (from {found.source}; not attested yet)"
                if found
                else "none found: pass --ca/--tdx URL to `%modelyo attest`, set MODELYO_CA_URL / "
                "MODELYO_TDX_URL, or start `modelyo dev up`",
                "" if found else "warn",
            )
        )
    sections.append(Section("Endpoints", tuple(rows)))

    owner_rows = []
    for name, label in ((CA_CLIENT_CERT, "CA owner"), (TDX_CLIENT_CERT, "VM owner")):
        info = _cert_info(workspace, name)
        if info is not None:
            owner_rows.append(Row(label, f"{info[1]} (certificate {info[0][:16]}…)"))
    if owner_rows:
        sections.append(Section("Owner (this directory's client certificates)", tuple(owner_rows)))

    if tdx_done:
        if gpus is not None:
            g_rows, g_note = gpu_rows(gpus, verified_here=False)
            sections.append(Section("GPUs", g_rows, g_note))
        else:
            sections.append(Section("GPUs", (Row("TDX VM", f"unreachable: {gpu_error}", "bad"),)))
        sections.append(
            Section("Certificates in this directory (SHA-256)", fingerprint_rows(workspace))
        )
    return Card(
        title=f"Modelyo workspace: {workspace.root}",
        sections=tuple(sections),
        banner=SIMULATED_BANNER if config.simulation else "",
    )


# --- %modelyo ps ----------------------------------------------------------------------------------


def container_rows(containers: list[ContainerInfo]) -> list[str]:
    """`modelyo docker ps`'s lines."""
    lines = []
    for info in containers:
        code = "" if info.exit_code is None else f" (exit {info.exit_code})"
        gpu = " gpu" if info.gpu else ""
        lines.append(f"{info.name:20} {info.status}{code}{gpu}  {info.image}  key {info.key_id}")
    return lines


# --- the %modelyo subcommands -------------------------------------------------------------------


def _parser(name: str, description: str) -> MagicArgumentParser:
    # MagicArgumentParser raises UsageError instead of exiting; -h is ours, for the same reason.
    parser = MagicArgumentParser(
        prog=f"%modelyo {name}", description=description, formatter_class=argparse.HelpFormatter
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show this help.")
    return parser


def build_parsers() -> dict[str, MagicArgumentParser]:
    """One parser per subcommand of `%modelyo` (like sparkmagic's `%spark`)."""
    attest = _parser(
        "attest",
        "Attest the Modelyo CA, then the TDX VM, and take ownership of both, as `modelyo "
        "attest` does, and show the attestation card. The six certificate files go to the "
        "notebook's working directory (keys with mode 0600).",
    )
    add = attest.add_argument
    add(
        "--ca",
        dest="ca_url",
        metavar="URL",
        help="CA URL (default: env, ./modelyo.toml, dev stack).",
    )
    add("--tdx", dest="tdx_url", metavar="URL", help="TDX VM (agent) URL (same discovery).")
    add(
        "--policy",
        dest="policy_file",
        type=Path,
        metavar="FILE",
        help="Policy file with the expected measurements.",
    )
    add(
        "--mrenclave",
        action="append",
        default=[],
        metavar="HEX",
        help="Expected CA MRENCLAVE; repeatable.",
    )
    add(
        "--mrsigner",
        action="append",
        default=[],
        metavar="HEX",
        help="Expected CA MRSIGNER; repeatable.",
    )
    add(
        "--mrtd",
        action="append",
        default=[],
        metavar="HEX",
        help="Expected TDX VM MRTD; repeatable.",
    )
    add(
        "--simulation",
        action="store_true",
        help="Trust the SIMULATED platform's root (development only: proves no hardware "
        "isolation).",
    )
    add("--sim-dir", type=Path, metavar="DIR", help="The simulated platform's state directory.")
    add("--at", type=int, metavar="UNIXTIME", help="Verify at this time (default: now).")
    add(
        "-C",
        "--directory",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="Where the files go (default: the working directory).",
    )
    add("--json", action="store_true", help="Print the result as JSON instead of the card.")

    status = _parser(
        "status",
        "Show this workspace: attested or not, endpoints, owner, GPUs, certificate "
        "fingerprints. Works before attestation, and says what to do.",
    )
    ps = _parser("ps", "List your containers in the attested TDX VM (as `modelyo docker ps`).")
    ps.add_argument("--json", action="store_true", help="Print as JSON.")
    logs = _parser("logs", "Print a container's output (as `modelyo docker logs`).")
    logs.add_argument("name", metavar="NAME", help="The container's name (see `%%modelyo ps`).")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="Keep streaming until the container exits (interrupt the kernel to stop).",
    )
    helper = _parser("help", "Show the help of every subcommand, or of one.")
    helper.add_argument("subcommand", nargs="?", metavar="SUBCOMMAND", help="attest, status, ...")
    return {"attest": attest, "status": status, "ps": ps, "logs": logs, "help": helper}


PARSERS = build_parsers()

MODELYO_HELP = """Modelyo: attest the confidential GPU environment and look after it.

    %modelyo attest [--ca URL] [--tdx URL] [--simulation] [--mrenclave HEX] ...
    %modelyo status
    %modelyo ps
    %modelyo logs NAME [-f]
    %modelyo help [SUBCOMMAND]      (also: %modelyo SUBCOMMAND -h)

Run cells in the attested TDX VM with %%modelyo_run (see %%modelyo_run?).

Load with `%load_ext modelyo_jupyter`, or for every kernel in ipython_kernel_config.py:
    c.InteractiveShellApp.extensions = ["modelyo_jupyter"]
or for one kernelspec, `--ext modelyo_jupyter` in its argv; or on first use of a magic:
    c.MagicsManager.lazy_magics = {"modelyo": "modelyo_jupyter",
                                   "modelyo_run": "modelyo_jupyter"}
"""


def full_help() -> str:
    """The help of `%modelyo`: the overview, then every subcommand's."""
    parts = [MODELYO_HELP]
    for name, parser in PARSERS.items():
        if name != "help":
            parts.append(parser.format_help())
    return "\n".join(parts)


def progress_mode(shell: Any, quiet: bool) -> ProgressMode:
    """A widget in a kernel (a frontend may render it, and its text/plain stays); printed
    phase lines elsewhere (terminal IPython, an in-process shell); nothing with -q."""
    if quiet:
        return "none"
    if getattr(shell, "kernel", None) is not None and have_widgets():
        return "widget"
    return "text"


def input_names(values: list[str]) -> list[str]:
    """`-i a -i b,c` -> [a, b, c], each a Python identifier (UsageError otherwise)."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name.isidentifier() or keyword.iskeyword(name):
                raise UsageError(f"{name!r} is not a variable name (-i/-o take Python names)")
            if name not in names:
                names.append(name)
    return names


def open_job_session(workspace: Workspace) -> JobSession:
    """The job session of `workspace` (a seam: tests put a fake session here)."""
    from modelyo.jobs import open_session

    return open_session(workspace)


@magics_class
class ModelyoMagics(Magics):
    """`%modelyo` and `%%modelyo_run`."""

    @line_magic
    def modelyo(self, line: str) -> None:
        # The docstring is `full_help()` (set below): `%modelyo?` shows every subcommand.
        words = line.strip().split(None, 1)
        if not words or words[0] in ("help", "-h", "--help", "?"):
            self._help(words[1] if len(words) > 1 else "")
            return
        command, rest = words[0], words[1] if len(words) > 1 else ""
        parser = PARSERS.get(command)
        if parser is None:
            raise UsageError(
                f"unknown subcommand {command!r}: use one of {', '.join(PARSERS)} "
                "(see `%modelyo help`)"
            )
        if {"-h", "--help"} & set(rest.split()):  # before parsing: NAME may be missing
            print(parser.format_help())
            return
        args = parser.parse_argstring(rest)
        with shown_as_cell_error():
            getattr(self, f"_{command}")(args)

    def _help(self, rest: str) -> None:
        args = PARSERS["help"].parse_argstring(rest)
        if args.subcommand:
            parser = PARSERS.get(args.subcommand)
            if parser is None:
                raise UsageError(f"no subcommand {args.subcommand!r}; one of {', '.join(PARSERS)}")
            print(parser.format_help())
        else:
            print(full_help())

    def _attest(self, args: Any) -> None:
        from modelyo.attest import AttestOptions, attest_workspace

        options = AttestOptions(
            ca_url=args.ca_url,
            tdx_url=args.tdx_url,
            policy_file=args.policy_file,
            mrenclave=tuple(args.mrenclave),
            mrsigner=tuple(args.mrsigner),
            mrtd=tuple(args.mrtd),
            simulation=args.simulation,
            sim_dir=args.sim_dir,
            at=args.at,
            directory=args.directory,
        )
        outcome = attest_workspace(options)
        if args.json:
            data = {
                "ca": outcome.ca.to_dict(),
                "tdx": outcome.tdx.to_dict() if outcome.tdx else None,
            }
            print(json.dumps(data, indent=2))
            return
        display(card_display(attestation_card(outcome)))

    def _status(self, args: Any) -> None:
        workspace = Workspace.here()
        gpus, problem = None, ""
        if attested(workspace):
            from modelyo.client.agent import AgentClient

            try:
                with AgentClient.for_owner(workspace) as agent:
                    gpus = agent.gpus()
            except ModelyoError as exc:  # status reports a VM it cannot reach, it does not fail
                problem = str(exc)
        display(card_display(status_card(workspace, gpus, problem)))

    def _ps(self, args: Any) -> None:
        from modelyo.client.agent import AgentClient

        workspace = Workspace.here()
        require_attested(workspace)
        with AgentClient.for_owner(workspace) as agent:
            listing = agent.containers()
        if args.json:
            print(json.dumps(listing.model_dump(), indent=2))
        elif not listing.containers:
            print("no containers in the TDX VM")
        else:
            print("\n".join(container_rows(listing.containers)))

    def _logs(self, args: Any) -> None:
        from modelyo.client.agent import AgentClient

        workspace = Workspace.here()
        require_attested(workspace)
        decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for stream in ("stdout", "stderr")
        }
        with AgentClient.for_owner(workspace) as agent:
            pairs = agent.logs(args.name, follow=args.follow, separate=True)
            # Two empty final pieces flush what the decoders hold (a cut-off character).
            ends: list[tuple[str, bytes | None]] = [("stdout", None), ("stderr", None)]
            for stream, data in itertools.chain(pairs, ends):
                text = decoders[stream].decode(data or b"", final=data is None)
                target = sys.stderr if stream == "stderr" else sys.stdout
                target.write(text)
                target.flush()

    @magic_arguments()
    @argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME",
        help="A variable to send to the job (repeatable, or a,b,c). DataFrames and Series "
        "travel as Parquet, scalars/lists/dicts as JSON, both encrypted.",
    )
    @argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="NAME",
        help="A variable the cell sets, brought back into the notebook (repeatable, or a,b).",
    )
    @argument("--image", metavar="IMG", help="Image to run in (default: modelyo/python:3.11).")
    @argument("--gpu", action="store_true", help="Give the container the VM's GPUs.")
    @argument("--timeout", type=float, metavar="S", help="Stop the job after S seconds.")
    @argument(
        "--key-id",
        default="default",
        metavar="K",
        help="Key id that encrypts the job's inputs and outputs (default: default).",
    )
    @argument(
        "--allow-pickle",
        action="store_true",
        help="Allow pickle for values with no typed codec (trusted code only).",
    )
    @argument("--name", metavar="NAME", help="The job container's name (default: generated).")
    @argument(
        "-q", "--quiet", action="store_true", help="No progress display (output still shows)."
    )
    @needs_local_scope
    @no_var_expand
    @cell_magic
    def modelyo_run(self, line: str, cell: str, local_ns: Mapping[str, Any] | None = None) -> None:
        """Run this cell in a fresh container in the attested TDX VM.

        The cell and its -i inputs are encrypted here, decrypted only inside the VM; the -o
        outputs come back encrypted and are set in the notebook. Remote stdout/stderr show as
        they arrive; an exception in the cell fails this cell with the remote traceback.
        Needs `%modelyo attest` first. Example:

            %%modelyo_run -i df -o summary --timeout 600
            summary = df.groupby("site").mean()
        """
        args = parse_argstring(self.modelyo_run, line)
        if not cell.strip():
            raise UsageError("the cell is empty: write the code to run below %%modelyo_run")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
        inputs = {name: self._lookup(name, local_ns) for name in input_names(args.input)}
        outputs = input_names(args.output)

        from modelyo.jobs import JobSpec

        spec_args: dict[str, Any] = {
            "code": cell,
            "inputs": inputs,
            "outputs": outputs,
            "gpu": args.gpu,
            "timeout": args.timeout,
            "key_id": args.key_id,
            "allow_pickle": args.allow_pickle,
            "name": args.name,
        }
        if args.image:
            spec_args["image"] = args.image
        spec = JobSpec(**spec_args)
        progress = JobProgress(progress_mode(self.shell, args.quiet))
        try:
            with shown_as_cell_error(), open_job_session(Workspace.here()) as session:
                result = session.run(spec, events=progress)
        except KeyboardInterrupt:
            print("modelyo_run interrupted: the job's container was stopped.", file=sys.stderr)
            raise
        # The engine refuses a job whose code did not set every output (JobError), so
        # nothing is half-updated here.
        self.shell.push(dict(result.outputs))

    def _lookup(self, name: str, local_ns: Mapping[str, Any] | None) -> Any:
        """rpy2's order: the caller's locals, then the notebook's namespace."""
        if local_ns is not None and name in local_ns:
            return local_ns[name]
        if name in self.shell.user_ns:
            return self.shell.user_ns[name]
        # A short error, like IPython's own for a missing name: the traceback would be ours.
        raise short_error(
            NameError(f"name {name!r} is not defined (-i takes a variable of the notebook)")
        )


ModelyoMagics.modelyo.__doc__ = full_help()

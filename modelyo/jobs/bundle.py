"""Job bundles: what goes into a job (`manifest.json` + inputs) and what comes back
(`outcome.json` + outputs), each a plain ustar tar. Pure: no network, no keys.

    manifest.json            JobManifest: code, inputs, output names, allow_pickle
    inputs/NAME.EXT          one file per input, EXT = the codec (parquet, json, pickle)

    outcome.json             JobOutcome: status, outputs, missing names, the remote error
    outputs/NAME.EXT         one file per output found

The header file comes first, so a reader knows what to expect. Every member is a regular file
whose name is exactly one of these; links, devices, folders, absolute or `..` names, names that
are not Python identifiers, duplicates, files no header mentions and mentioned files that are
missing are all refused, as are unknown formats and versions (`JobError`, saying which).
"""

from __future__ import annotations

import io
import json
import keyword
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from modelyo.errors import JobError
from modelyo.jobs.codec import CODECS, EXTENSIONS

JOB_FORMAT = "modelyo-job"
RESULT_FORMAT = "modelyo-job-result"
VERSION = 1
MANIFEST = "manifest.json"
OUTCOME = "outcome.json"
INPUTS = "inputs"
OUTPUTS = "outputs"
# Names go into ustar's 100-byte name field with their folder and extension.
MAX_NAME_BYTES = 80
# A header is small; a larger one is not ours.
MAX_HEADER_BYTES = 64 << 20
_COPY_CHUNK = 1 << 20
_MEMBER = re.compile(r"^(inputs|outputs)/([^/]+)\.(parquet|json|pickle)$")

Kind = Literal["job", "result"]


def check_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a Python identifier (not a keyword) a bundle can carry."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise JobError(
            f"{what} {name!r} is not a Python identifier; inputs and outputs are variable "
            "names such as df or result_2"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise JobError(f"{what} {name[:20]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def value_file(folder: str, name: str, codec: str) -> str:
    """The member name of value `name` written with `codec` in `folder` (inputs, outputs)."""
    return f"{folder}/{check_name(name)}.{EXTENSIONS[codec]}"


def _unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise JobError(f"{what} {name!r} appears twice; give each a different name")
        seen.add(name)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValueEntry(_Model):
    """One value in a bundle: its variable name, codec, and member file."""

    name: str
    codec: Literal["parquet", "json", "pickle"]
    file: str

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return _as_value_error(check_name, name)

    @model_validator(mode="after")
    def _file(self) -> ValueEntry:
        match = _MEMBER.match(self.file)
        if not match or match[2] != self.name or match[3] != EXTENSIONS[self.codec]:
            raise ValueError(
                f"file {self.file!r} of value {self.name!r} must be "
                f"inputs/{self.name}.{EXTENSIONS[self.codec]} or outputs/..."
            )
        return self


class RemoteErrorInfo(_Model):
    """The user's exception, as the remote side formatted it."""

    ename: str
    evalue: str
    traceback: list[str]


class JobManifest(_Model):
    """What to run: the code, its inputs (in `inputs/`) and the names to bring back."""

    format: Literal["modelyo-job"] = JOB_FORMAT
    version: Literal[1] = VERSION
    code: str
    inputs: list[ValueEntry] = []
    outputs: list[str] = []
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _check(self) -> JobManifest:
        for entry in self.inputs:
            if not entry.file.startswith(f"{INPUTS}/"):
                raise ValueError(f"input {entry.name!r} must be in {INPUTS}/, not {entry.file}")
        _as_value_error(_unique, [e.name for e in self.inputs], "input")
        _as_value_error(_unique, self.outputs, "output")
        for name in self.outputs:
            _as_value_error(check_name, name, "output")
        return self


class JobOutcome(_Model):
    """What came back: outputs found (in `outputs/`), names not found, the user's error."""

    format: Literal["modelyo-job-result"] = RESULT_FORMAT
    version: Literal[1] = VERSION
    status: Literal["ok", "error"]
    outputs: list[ValueEntry] = []
    missing: list[str] = []
    error: RemoteErrorInfo | None = None

    @model_validator(mode="after")
    def _check(self) -> JobOutcome:
        for entry in self.outputs:
            if not entry.file.startswith(f"{OUTPUTS}/"):
                raise ValueError(f"output {entry.name!r} must be in {OUTPUTS}/, not {entry.file}")
        _as_value_error(_unique, [e.name for e in self.outputs] + self.missing, "output")
        if (self.status == "error") != (self.error is not None):
            raise ValueError("status 'error' comes with an error, and only it")
        return self


def _as_value_error(check: Any, *args: Any) -> Any:
    # pydantic reports ValueError from validators with the field's location.
    try:
        return check(*args)
    except JobError as exc:
        raise ValueError(str(exc)) from None


Header = JobManifest | JobOutcome


def _header_name(kind: Kind) -> str:
    return MANIFEST if kind == "job" else OUTCOME


def parse_header(data: bytes, kind: Kind) -> Header:
    """Parse `manifest.json` (kind "job") or `outcome.json` (kind "result"), checking the
    format and version first so a bundle of another kind or version says so."""
    name, wanted = (MANIFEST, JOB_FORMAT) if kind == "job" else (OUTCOME, RESULT_FORMAT)
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise JobError(f"{name} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JobError(f"{name} is not a JSON object")
    if document.get("format") != wanted:
        raise JobError(
            f"{name} has format {document.get('format')!r}, expected {wanted!r}: this is not "
            f"a Modelyo {'job' if kind == 'job' else 'job result'} bundle"
        )
    if document.get("version") != VERSION:
        raise JobError(
            f"{name} has version {document.get('version')!r}; this Modelyo reads version "
            f"{VERSION}: use the same Modelyo version on both sides (rebuild the job image "
            "with `modelyo image build-base`)"
        )
    model = JobManifest if kind == "job" else JobOutcome
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or name}: {e['msg']}" for e in exc.errors()
        )
        raise JobError(f"{name} is invalid: {problems}") from None


def entries(header: Header) -> list[ValueEntry]:
    """The value files a header names."""
    return list(header.inputs if isinstance(header, JobManifest) else header.outputs)


# --- writing -------------------------------------------------------------------------------------


class BundleWriter:
    """Writes a bundle to a stream (seekable or not): the header first, then the values.

        with BundleWriter(sink, manifest) as bundle:
            bundle.add_bytes("inputs/df.parquet", data)

    Closing checks that every value the header names was added.
    """

    def __init__(self, sink: BinaryIO, header: Header) -> None:
        self._header = header
        self._expected = {e.file for e in entries(header)}
        self._added: set[str] = set()
        self._tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT)
        name = MANIFEST if isinstance(header, JobManifest) else OUTCOME
        self._add(name, io.BytesIO(header.model_dump_json().encode()), None)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self._tar.close()

    def add_bytes(self, file: str, data: bytes | bytearray | memoryview) -> None:
        """Add the value file `file` (as the header names it) with these bytes (not copied
        whole: tarfile reads them a chunk at a time)."""
        view = memoryview(data).cast("B")
        self._add_value(file, _ViewStream(view), view.nbytes)  # type: ignore[arg-type]

    def add_file(self, file: str, path: str | os.PathLike[str]) -> None:
        """Add the value file `file` from a regular file at `path` (links refused)."""
        with open(path, "rb", opener=_no_follow) as handle:
            status = os.fstat(handle.fileno())
            self._add_value(file, handle, status.st_size)

    def _add_value(self, file: str, stream: BinaryIO, size: int) -> None:
        if file not in self._expected:
            raise JobError(f"{file} is not a value the bundle's header names")
        if file in self._added:
            raise JobError(f"{file} was added twice")
        self._added.add(file)
        self._add(file, stream, size)

    def _add(self, name: str, stream: BinaryIO, size: int | None) -> None:
        info = tarfile.TarInfo(name)
        if size is None:
            size = len(stream.getbuffer())  # type: ignore[attr-defined]
        info.size, info.mode, info.mtime = size, 0o600, 0
        self._tar.addfile(info, stream)

    def close(self) -> None:
        missing = sorted(self._expected - self._added)
        self._tar.close()
        if missing:
            raise JobError(f"the bundle lacks {', '.join(missing)}, which its header names")


class _ViewStream:
    """Reads a memoryview a chunk at a time (io.BytesIO(view) would copy it whole)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._position = view, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._position + size
        chunk = bytes(self._view[self._position : end])
        self._position += len(chunk)
        return chunk


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def write_bundle(sink: BinaryIO, header: Header, values: Mapping[str, bytes]) -> None:
    """Write a whole bundle: `values` maps each file the header names to its bytes."""
    with BundleWriter(sink, header) as bundle:
        for entry in entries(header):
            if entry.file not in values:
                raise JobError(f"no data for {entry.file}, which the header names")
            bundle.add_bytes(entry.file, values[entry.file])


def pack_directory(directory: str | os.PathLike[str], sink: BinaryIO, kind: Kind) -> Header:
    """Tar a bundle directory (header + value files, as laid out above) into `sink`."""
    root = Path(directory)
    name = _header_name(kind)
    try:
        with open(root / name, "rb", opener=_no_follow) as handle:
            header = parse_header(handle.read(MAX_HEADER_BYTES), kind)
    except FileNotFoundError:
        raise JobError(f"{root} has no {name}") from None
    with BundleWriter(sink, header) as bundle:
        for entry in entries(header):
            try:
                bundle.add_file(entry.file, root / entry.file)
            except FileNotFoundError:
                raise JobError(f"{root} has no {entry.file}, which {name} names") from None
            except OSError as exc:  # ELOOP: a symbolic link
                raise JobError(f"cannot read {root / entry.file}: {exc.strerror}") from None
    return header


# --- reading -------------------------------------------------------------------------------------


class BundleReader:
    """A checked bundle from a seekable stream, bytes or a path.

    Every member is checked when it is opened (see the module docstring); `header` is the
    manifest or outcome, and `open(entry)` gives a value file's bytes as a stream.
    """

    def __init__(self, source: BinaryIO | bytes | str | os.PathLike[str], kind: Kind) -> None:
        self._buffer: memoryview | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._buffer = memoryview(source).cast("B")
            source = io.BytesIO(source)
        elif isinstance(source, io.BytesIO):
            self._buffer = source.getbuffer()
            source.seek(0)
        self._owned = None
        if isinstance(source, str | os.PathLike):
            source = self._owned = open(source, "rb", opener=_no_follow)
        try:
            self._tar = tarfile.open(fileobj=source, mode="r:")
            self._members = self._check_members(kind)
        except tarfile.TarError as exc:
            self.close()
            raise JobError(f"the {kind} bundle is not a readable tar: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _check_members(self, kind: Kind) -> dict[str, tarfile.TarInfo]:
        header_name = _header_name(kind)
        members: dict[str, tarfile.TarInfo] = {}
        for member in self._tar.getmembers():
            name = member.name
            if name in members:
                raise JobError(f"the {kind} bundle holds {name!r} twice")
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                what = "a link" if member.issym() or member.islnk() else "not a regular file"
                raise JobError(f"the {kind} bundle member {name!r} is {what}; refused")
            if name.startswith("/") or ".." in name.split("/"):
                raise JobError(f"the {kind} bundle member {name!r} points outside the bundle")
            match = _MEMBER.match(name)
            if name == _header_name("result" if kind == "job" else "job"):
                other = "job result" if kind == "job" else "job"
                raise JobError(
                    f"the bundle holds {name}: it is a {other} bundle, not a "
                    f"{'job' if kind == 'job' else 'job result'} bundle"
                )
            if name != header_name and not match:
                raise JobError(f"the {kind} bundle member {name!r} is not part of the format")
            if match:
                check_name(match[2], f"the {kind} bundle member {name!r} has a name that")
            members[name] = member
        if header_name not in members:
            raise JobError(f"the {kind} bundle has no {header_name}")
        if members[header_name].size > MAX_HEADER_BYTES:
            raise JobError(f"the {kind} bundle's {header_name} is implausibly large")
        self.header = parse_header(self._read(members[header_name]), kind)
        named = {e.file for e in entries(self.header)}
        missing = sorted(named - members.keys())
        if missing:
            raise JobError(
                f"the {kind} bundle lacks {', '.join(missing)}, which {header_name} names"
            )
        extra = sorted(members.keys() - named - {header_name})
        if extra:
            raise JobError(
                f"the {kind} bundle holds {', '.join(extra)}, which {header_name} does not name"
            )
        return members

    def _read(self, member: tarfile.TarInfo) -> bytes:
        handle = self._tar.extractfile(member)
        assert handle is not None  # regular files only, checked above
        return handle.read()

    def open(self, entry: ValueEntry) -> BinaryIO:
        """The bytes of a value file as a (seekable) stream."""
        handle = self._tar.extractfile(self._members[entry.file])
        assert handle is not None
        return handle  # type: ignore[return-value]

    def view(self, entry: ValueEntry) -> memoryview | None:
        """A value file's bytes without copying them, when the bundle is in memory (bytes or
        io.BytesIO); None otherwise."""
        if self._buffer is None:
            return None
        member = self._members[entry.file]
        return self._buffer[member.offset_data : member.offset_data + member.size]

    def close(self) -> None:
        self._buffer = None  # views already handed out keep the memory they need
        tar = getattr(self, "_tar", None)
        if tar is not None:
            tar.close()
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpack_directory(
    source: BinaryIO | bytes | str | os.PathLike[str], directory: str | os.PathLike[str], kind: Kind
) -> Header:
    """Extract a checked bundle into the empty or new folder `directory`; return its header."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with BundleReader(source, kind) as bundle:
        header_name = _header_name(kind)
        (root / header_name).write_bytes(bundle.header.model_dump_json().encode())
        for entry in entries(bundle.header):
            target = root / entry.file
            target.parent.mkdir(exist_ok=True)
            with bundle.open(entry) as src, open(target, "xb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
        return bundle.header


__all__ = [
    "CODECS",
    "INPUTS",
    "JOB_FORMAT",
    "MANIFEST",
    "OUTCOME",
    "OUTPUTS",
    "RESULT_FORMAT",
    "VERSION",
    "BundleReader",
    "BundleWriter",
    "JobManifest",
    "JobOutcome",
    "RemoteErrorInfo",
    "ValueEntry",
    "check_name",
    "entries",
    "pack_directory",
    "parse_header",
    "unpack_directory",
    "value_file",
    "write_bundle",
]

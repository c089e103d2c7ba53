"""Job bundles: the tar layout round-trips, and everything outside it is refused clearly."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from modelyo.errors import JobError
from modelyo.jobs.bundle import (
    BundleReader,
    BundleWriter,
    JobManifest,
    JobOutcome,
    RemoteErrorInfo,
    ValueEntry,
    check_name,
    pack_directory,
    parse_header,
    unpack_directory,
    value_file,
    write_bundle,
)
from modelyo.jobs.codec import encode_value, read_value


def job(**overrides) -> JobManifest:
    fields = {
        "code": "total = x + 1",
        "inputs": [ValueEntry(name="x", codec="json", file="inputs/x.json")],
        "outputs": ["total"],
    }
    return JobManifest(**{**fields, **overrides})


def job_bytes(manifest: JobManifest | None = None, values: dict | None = None) -> bytes:
    sink = io.BytesIO()
    write_bundle(
        sink, manifest or job(), values if values is not None else {"inputs/x.json": b"41"}
    )
    return sink.getvalue()


def raw_tar(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    """A tar with exactly these members, whatever they are (the attacker's view)."""
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def manifest_json(**overrides) -> bytes:
    return json.dumps({**json.loads(job().model_dump_json()), **overrides}).encode()


def test_a_job_bundle_round_trips_with_values():
    codec, data = encode_value({"a": [1, 2]})
    manifest = job(
        inputs=[ValueEntry(name="x", codec=codec, file=value_file("inputs", "x", codec))]
    )
    blob = job_bytes(manifest, {"inputs/x.json": data})
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        # plain ustar, header first, private modes, no timestamps
        assert tar.getnames() == ["manifest.json", "inputs/x.json"]
        assert all(m.mode == 0o600 and m.mtime == 0 for m in tar.getmembers())
    with BundleReader(blob, "job") as bundle:
        assert bundle.header == manifest
        entry = bundle.header.inputs[0]
        assert read_value(bundle.open(entry), entry.codec) == {"a": [1, 2]}


def test_an_outcome_round_trips_through_a_directory(tmp_path):
    outcome = JobOutcome(
        status="error",
        outputs=[ValueEntry(name="y", codec="json", file="outputs/y.json")],
        missing=["z"],
        error=RemoteErrorInfo(ename="ValueError", evalue="bad", traceback=["line 1"]),
    )
    folder = tmp_path / "out"
    (folder / "outputs").mkdir(parents=True)
    (folder / "outcome.json").write_text(outcome.model_dump_json())
    (folder / "outputs" / "y.json").write_bytes(b"[1]")
    sink = io.BytesIO()
    assert pack_directory(folder, sink, "result") == outcome
    again = tmp_path / "again"
    assert unpack_directory(sink.getvalue(), again, "result") == outcome
    assert (again / "outputs" / "y.json").read_bytes() == b"[1]"


def test_pack_directory_refuses_missing_files_and_links(tmp_path):
    outcome = JobOutcome(
        status="ok", outputs=[ValueEntry(name="y", codec="json", file="outputs/y.json")]
    )
    folder = tmp_path / "out"
    (folder / "outputs").mkdir(parents=True)
    (folder / "outcome.json").write_text(outcome.model_dump_json())
    with pytest.raises(JobError, match=r"has no outputs/y.json, which outcome.json names"):
        pack_directory(folder, io.BytesIO(), "result")
    (tmp_path / "secret").write_text("not yours")
    (folder / "outputs" / "y.json").symlink_to(tmp_path / "secret")
    with pytest.raises(JobError, match="cannot read"):
        pack_directory(folder, io.BytesIO(), "result")
    with pytest.raises(JobError, match=r"has no manifest\.json"):
        pack_directory(folder, io.BytesIO(), "job")


@pytest.mark.parametrize("name", ["df", "result_2", "_x", "données"])
def test_identifiers_are_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "2df", "a-b", "a.b", "../x", "x/y", "class", "a b", 3])
def test_other_names_are_refused(name):
    with pytest.raises(JobError, match="is not a Python identifier"):
        check_name(name)


def test_manifest_refuses_bad_and_duplicate_names():
    with pytest.raises(ValueError, match="not a Python identifier"):
        job(outputs=["ok", "not-ok"])
    with pytest.raises(ValueError, match="output 'y' appears twice"):
        job(outputs=["y", "y"])
    entry = ValueEntry(name="x", codec="json", file="inputs/x.json")
    with pytest.raises(ValueError, match="input 'x' appears twice"):
        job(inputs=[entry, entry])
    with pytest.raises(ValueError, match=r"must be inputs/x\.json"):
        ValueEntry(name="x", codec="json", file="inputs/../../etc/passwd")
    with pytest.raises(ValueError, match=r"must be inputs/x\.parquet"):
        ValueEntry(name="x", codec="parquet", file="inputs/x.json")


def test_unknown_format_and_version_are_refused():
    with pytest.raises(JobError, match=r"format 'modelyo-job-result', expected 'modelyo-job'"):
        parse_header(manifest_json(format="modelyo-job-result"), "job")
    with pytest.raises(JobError, match=r"version 2; this Modelyo reads version 1"):
        parse_header(manifest_json(version=2), "job")
    with pytest.raises(JobError, match=r"manifest\.json is not JSON"):
        parse_header(b"{", "job")
    with pytest.raises(JobError, match=r"manifest\.json is invalid: surprise: Extra inputs"):
        parse_header(manifest_json(surprise=1), "job")
    with pytest.raises(JobError, match="it is a job bundle, not a job result bundle"):
        BundleReader(job_bytes(), "result")


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("inputs/x.json", b"1")], "has no manifest.json"),
        ([("manifest.json", manifest_json())], r"lacks inputs/x.json, which manifest.json names"),
        (
            [("manifest.json", manifest_json()), ("inputs/x.json", b"1"), ("inputs/y.json", b"")],
            r"holds inputs/y.json, which manifest.json does not name",
        ),
        (
            [("manifest.json", manifest_json()), ("inputs/x.json", b"1"), ("inputs/x.json", b"2")],
            r"holds 'inputs/x.json' twice",
        ),
        (
            [("manifest.json", manifest_json()), _link("inputs/x.json", tarfile.SYMTYPE, "/etc")],
            r"'inputs/x.json' is a link; refused",
        ),
        (
            [("manifest.json", manifest_json()), _link("inputs/x.json", tarfile.LNKTYPE, "a")],
            r"'inputs/x.json' is a link; refused",
        ),
        ([("manifest.json", manifest_json()), _folder("inputs")], "is not a regular file"),
        ([("/manifest.json", manifest_json())], "points outside the bundle"),
        ([("inputs/../manifest.json", manifest_json())], "points outside the bundle"),
        ([("manifest.json", manifest_json()), ("notes.txt", b"")], "is not part of the format"),
        (
            [("manifest.json", manifest_json()), ("inputs/class.json", b"1")],
            "is not a Python identifier",
        ),
    ],
)
def test_bundles_outside_the_format_are_refused(members, message):
    with pytest.raises(JobError, match=message):
        BundleReader(raw_tar(members), "job")


def test_garbage_and_truncated_tars_are_refused():
    with pytest.raises(JobError, match="not a readable tar"):
        BundleReader(b"\x00garbage" * 100, "job")
    blob = job_bytes()
    with pytest.raises(JobError):
        BundleReader(blob[:600], "job")


def test_writer_refuses_values_the_header_does_not_name_and_missing_ones():
    with pytest.raises(JobError, match=r"no data for inputs/x.json"):
        job_bytes(values={})
    with (
        pytest.raises(JobError, match=r"inputs/y.json is not a value the bundle's header names"),
        BundleWriter(io.BytesIO(), job()) as bundle,
    ):
        bundle.add_bytes("inputs/y.json", b"2")
    bundle = BundleWriter(io.BytesIO(), job())
    with pytest.raises(JobError, match=r"the bundle lacks inputs/x.json"):
        bundle.close()

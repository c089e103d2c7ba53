"""The CA's Gramine manifest template, rendered the way `gramine-manifest` renders it.

Gramine cannot be installed here (no Debian or PyPI package), so the template is rendered with
Jinja2 in the environment `gramine-manifest` builds (python/graminelibos/gen_jinja_env.py:
StrictUndefined, the `gramine.*` and `python.*` globals). The `python.*` helpers are real: they
point at this machine's interpreter, the one running the tests, whose sys.path holds modelyo,
ca_enclave and their dependencies, exactly as a CA environment's would. Only the `gramine.*`
paths are stand-ins, since there is no Gramine installation to point at. When `gramine-manifest`
is on PATH, the last test renders with it too.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import pytest

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "ca_enclave" / "gramine"
TEMPLATE = HERE / "modelyo-ca.manifest.template"
CA_ENCLAVE_PRESENT = (REPO / "ca_enclave" / "__init__.py").is_file()

# The CA's interpreter: this one (a venv's bin/python), and the real binary behind it.
# The template refuses code under /tmp (the enclave mounts a tmpfs there). When this checkout
# itself lives under /tmp (a CI clone may), the tests name the same directories through
# /proc/self/root, an alias of "/" that does not start with /tmp: same files, other spelling.
_ALIAS = "/proc/self/root" if str(REPO).startswith("/tmp/") else ""


def _alias(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return _ALIAS + text if _ALIAS and text.startswith("/tmp/") else text


CA_PYTHON = _alias(sys.executable)
ENTRYPOINT = _alias(os.path.realpath(sys.executable))
# Stand-ins: where a Debian/Ubuntu Gramine package puts these.
GRAMINE_PKGLIBDIR = Path("/usr/lib/x86_64-linux-gnu/gramine")
# graminelibos.gen_jinja_env.python_get_sys_path runs exactly this in the interpreter.
PRINT_SYS_PATH = "import sys; print('\\0'.join(path for path in sys.path if path), end='')"
# What the Makefile keeps out of the interpreter's environment when asking for its sys.path.
SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONSAFEPATH")

# Manifest keys Gramine 1.8+ accepts, per section (python/graminelibos/manifest_check.py; only
# the sections and keys a CA manifest could plausibly use). gramine-manifest rejects others.
GRAMINE_KEYS = {
    "libos": set("entrypoint check_invalid_pointers".split()),
    "loader": set(
        "entrypoint argv argv_src_file env env_src_file gid uid insecure__use_cmdline_argv "
        "insecure__use_host_env insecure__disable_aslr log_file log_level".split()
    ),
    "fs": set("mounts root start_dir insecure__keys".split()),
    "sgx": set(
        "allowed_files cpu_features debug edmm_enable enable_stats enclave_size "
        "file_check_policy insecure__allow_memfaults_without_exinfo insecure__rpc_thread_num "
        "isvprodid isvsvn max_threads preheat_enclave profile ra_client_linkable "
        "ra_client_spid remote_attestation seal_key trusted_files use_exinfo vtune_profile "
        "trusted_files_cache_size".split()
    ),
    "sys": set(
        "allowed_ioctls brk disallow_subprocesses enable_extra_runtime_domain_names_conf "
        "enable_sigterm_injection experimental__enable_flock insecure__allow_eventfd "
        "ioctl_structs debug__mock_syscalls stack fds".split()
    ),
}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@functools.cache
def python_libs(binary: str) -> str:
    """The shared libraries `binary` links, as the Makefile passes them (`ldd` paths)."""
    if shutil.which("ldd") is None:
        return ""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    fields = [line.split() for line in out.splitlines()]
    return " ".join(
        _alias(f[2]) for f in fields if len(f) > 2 and f[1] == "=>" and f[2].startswith("/")
    )


class Runtimedir:
    """Gramine's `gramine.runtimedir()`: the directory of its patched glibc."""

    def __call__(self, libc: str = "glibc") -> Path:
        return GRAMINE_PKGLIBDIR / "runtime" / libc

    def __str__(self) -> str:
        return str(self())


def make_gramine_env(extra_sys_path: list[Path] | None = None) -> jinja2.Environment:
    """The Jinja environment gramine-manifest renders in, with this machine's Python."""

    def get_sys_path(interpreter: Any, include_nonexisting: bool = False) -> Iterator[Path]:
        # As graminelibos.gen_jinja_env.python_get_sys_path: ask the interpreter, drop empty
        # entries and, by default, entries that do not exist.
        out = subprocess.check_output(
            [os.fspath(interpreter), "-c", PRINT_SYS_PATH], env=_clean_env()
        )
        for raw in out.split(b"\0"):
            path = pathlib.Path(_alias(os.fsdecode(raw)))
            if include_nonexisting or path.exists():
                yield path
        yield from extra_sys_path or []

    paths = sysconfig.get_paths()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["gramine"] = {
        "libos": GRAMINE_PKGLIBDIR / "libsysdb.so",
        "pkglibdir": GRAMINE_PKGLIBDIR,
        "runtimedir": Runtimedir(),
    }
    env.globals["python"] = {
        "stdlib": Path(paths["stdlib"]),
        "platstdlib": Path(paths["platstdlib"]),
        "purelib": Path(paths["purelib"]),
        "get_config_var": sysconfig.get_config_var,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "get_path": sysconfig.get_path,
        "get_paths": sysconfig.get_paths,
        "implementation": sys.implementation,
        "get_sys_path": get_sys_path,
    }
    env.globals["env"] = os.environ
    return env


@pytest.fixture(scope="module")
def gramine_env() -> Iterator[jinja2.Environment]:
    if CA_ENCLAVE_PRESENT:
        yield make_gramine_env()
        return
    # The template refuses an environment without ca_enclave; until the CA package exists in
    # this tree, a stub stands in for it (and the checks about it are skipped). Not under /tmp,
    # where the template refuses code (the enclave's /tmp is a tmpfs that would hide it).
    stub = Path(tempfile.mkdtemp(prefix="modelyo-stub-ca-", dir="/var/tmp"))
    try:
        (stub / "ca_enclave").mkdir()
        (stub / "ca_enclave" / "__init__.py").write_text("")
        yield make_gramine_env([stub])
    finally:
        shutil.rmtree(stub)


def render_text(env: jinja2.Environment, **defines: str) -> str:
    """Render like the Makefile does: every value a string, as `-Dname=value` gives."""
    variables = {
        "ca_python": CA_PYTHON,
        "entrypoint": ENTRYPOINT,
        "python_libs": python_libs(ENTRYPOINT),
    }
    variables.update(defines)
    return env.from_string(TEMPLATE.read_text()).render(**variables)


def render(env: jinja2.Environment, **defines: str) -> dict[str, Any]:
    return tomllib.loads(render_text(env, **defines))


def uris(entries: list[Any]) -> list[str]:
    return [e if isinstance(e, str) else e["uri"] for e in entries]


def covered(path: str, dirs: list[str]) -> bool:
    """True when `path` is one of `dirs` or inside one of them."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def trusted_dirs(manifest: dict[str, Any]) -> list[str]:
    return [u[5:].rstrip("/") for u in uris(manifest["sgx"]["trusted_files"]) if u.endswith("/")]


def package_dirs(names: list[str]) -> dict[str, str | None]:
    """Where the CA's interpreter finds each package (None: not importable)."""
    code = (
        "import importlib.util, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = spec.submodule_search_locations[0] if spec else None\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.check_output([CA_PYTHON, "-c", code, *names], env=_clean_env())
    return {name: _alias(found) if found else None for name, found in json.loads(out).items()}


def ca_args(manifest: dict[str, Any]) -> list[str]:
    """The CA's own arguments: what follows `-m ca_enclave.server` in loader.argv."""
    argv = manifest["loader"]["argv"]
    start = argv.index("-m")
    assert argv[start + 1] == "ca_enclave.server", argv
    return argv[start + 2 :]


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == option]


# --- what a reviewer relies on -----------------------------------------------------------------


def test_production_enclave_with_dcap_remote_attestation(gramine_env: jinja2.Environment) -> None:
    m = render(gramine_env)
    assert m["sgx"]["remote_attestation"] == "dcap"
    assert m["sgx"]["debug"] is False
    assert m["sgx"]["file_check_policy"] == "strict"
    assert m["loader"]["log_level"] == "error"
    # Profiling and stats only work in debug enclaves; neither may be switched on.
    assert "enable_stats" not in m["sgx"] and "profile" not in m["sgx"]


def test_no_command_line_or_environment_comes_from_the_host(
    gramine_env: jinja2.Environment,
) -> None:
    m = render(gramine_env, hosts="ca.example.com")
    loader = m["loader"]
    for key in ("insecure__use_cmdline_argv", "argv_src_file", "insecure__use_host_env"):
        assert key not in loader, key
    assert "env_src_file" not in loader
    # Every variable has a fixed string value: no `{ passthrough = true }` tables.
    assert loader["env"] and all(isinstance(v, str) for v in loader["env"].values()), loader["env"]
    assert not any(k.startswith("LD_PRELOAD") or k == "PYTHONHOME" for k in loader["env"])

    def insecure_keys(table: dict[str, Any], prefix: str = "") -> list[str]:
        found = []
        for key, value in table.items():
            if "insecure__" in key:
                found.append(prefix + key)
            if isinstance(value, dict):
                found += insecure_keys(value, f"{prefix}{key}.")
        return found

    assert insecure_keys(m) == []


def test_argv_starts_the_ca_with_the_listen_address_and_state_dir(
    gramine_env: jinja2.Environment,
) -> None:
    m = render(
        gramine_env,
        listen="10.0.0.5:9443",
        state_dir="/srv/modelyo-ca/state",
        hosts="ca.example.com, 10.0.0.5",
        collateral="/srv/modelyo-ca/in/collateral.json",
    )
    argv = m["loader"]["argv"]
    assert argv[0] == ENTRYPOINT == m["libos"]["entrypoint"]
    assert argv[1 : argv.index("-m")] == ["-S", "-B", "-P"]
    args = ca_args(m)
    assert option_values(args, "--platform") == ["gramine"]
    assert option_values(args, "--listen") == ["10.0.0.5:9443"]
    assert option_values(args, "--state-dir") == ["/srv/modelyo-ca/state"]
    assert option_values(args, "--host") == ["ca.example.com", "10.0.0.5"]
    assert option_values(args, "--collateral") == ["/srv/modelyo-ca/in/collateral.json"]
    assert "--sim-dir" not in args and "--vm-policy" not in args

    if CA_ENCLAVE_PRESENT:
        # The CA's own parser takes the command line as written into the manifest.
        from ca_enclave.config import parse_args

        config = parse_args(args)
        assert (config.host, config.port) == ("10.0.0.5", 9443)
        assert config.state_dir == Path("/srv/modelyo-ca/state")
        assert config.platform == "gramine"
        assert config.hosts == ("ca.example.com", "10.0.0.5")


def test_argv_defaults(gramine_env: jinja2.Environment) -> None:
    args = ca_args(render(gramine_env))
    assert option_values(args, "--listen") == ["0.0.0.0:8443"]
    assert option_values(args, "--state-dir") == ["/var/lib/modelyo-ca"]
    assert option_values(args, "--collateral") == ["/etc/modelyo-ca/collateral.json"]
    assert "--host" not in args  # the CA's default names then


def test_trusted_files_hold_the_interpreter_and_every_package_the_ca_imports(
    gramine_env: jinja2.Environment,
) -> None:
    m = render(gramine_env)
    trusted = uris(m["sgx"]["trusted_files"])
    dirs = trusted_dirs(m)
    mounts = [mount["path"] for mount in m["fs"]["mounts"]]
    pythonpath = m["loader"]["env"]["PYTHONPATH"].split(":")

    assert f"file:{ENTRYPOINT}" in trusted
    assert ENTRYPOINT in mounts
    stdlib = os.path.dirname(os.__file__)
    assert covered(stdlib, dirs) and covered(stdlib, mounts)

    required = ["modelyo", "cryptography", "dcap_qvl", "pydantic", "pydantic_core"]
    if CA_ENCLAVE_PRESENT:
        required.append("ca_enclave")
    optional = ["fastapi", "starlette", "uvicorn", "anyio", "h11", "click", "rich"]
    found = package_dirs(required + optional)
    for name in required:
        assert found[name], f"{name} is not importable by {CA_PYTHON}"
    for name, where in found.items():
        if where is None:
            continue
        assert covered(where, dirs), f"{name} ({where}) is not in sgx.trusted_files"
        assert covered(where, mounts), f"{name} ({where}) is not mounted"
        assert os.path.dirname(where) in pythonpath, f"{name} is not on PYTHONPATH"

    # Every PYTHONPATH entry is code the signer hashed; nothing else is importable.
    for entry in pythonpath:
        assert entry in dirs, f"PYTHONPATH entry {entry} is not a trusted directory"


def test_interpreter_libraries_outside_the_system_dirs_are_trusted(
    gramine_env: jinja2.Environment,
) -> None:
    libs = "/opt/py/lib/libpython3.11.so.1.0 /lib/x86_64-linux-gnu/libc.so.6"
    m = render(gramine_env, python_libs=libs)
    trusted = uris(m["sgx"]["trusted_files"])
    assert "file:/opt/py/lib/libpython3.11.so.1.0" in trusted
    assert "file:/lib/x86_64-linux-gnu/libc.so.6" not in trusted  # covered by the libdir entry
    assert "file:/lib/x86_64-linux-gnu/" in trusted
    assert "/opt/py/lib" in [mount["path"] for mount in m["fs"]["mounts"]]
    ld_path = m["loader"]["env"]["LD_LIBRARY_PATH"].split(":")
    assert ld_path[0] == "/lib"  # Gramine's patched glibc before the system's
    assert "/opt/py/lib" in ld_path


def test_state_dir_is_a_plain_read_write_mount_and_tmp_is_tmpfs(
    gramine_env: jinja2.Environment,
) -> None:
    m = render(gramine_env, state_dir="/srv/ca-state/")
    mounts = m["fs"]["mounts"]
    state = [mount for mount in mounts if mount["path"] == "/srv/ca-state"]
    assert state == [
        {"path": "/srv/ca-state", "uri": "file:/srv/ca-state"}
    ]  # chroot, not encrypted
    assert "file:/srv/ca-state/" in m["sgx"]["allowed_files"]
    assert not covered("/srv/ca-state", trusted_dirs(m))
    assert [mount for mount in mounts if mount.get("type") == "tmpfs"] == [
        {"type": "tmpfs", "path": "/tmp"}
    ]
    assert not [mount for mount in mounts if mount.get("type") == "encrypted"]
    assert mounts[-1]["path"] == "/tmp"  # nothing mounted after it could be hidden by it


def test_allowed_files_are_the_state_and_intel_signed_collateral_only(
    gramine_env: jinja2.Environment,
) -> None:
    assert render(gramine_env)["sgx"]["allowed_files"] == [
        "file:/var/lib/modelyo-ca/",
        "file:/etc/modelyo-ca/collateral.json",
    ]
    m = render(
        gramine_env,
        vm_collateral="/etc/modelyo-ca/vm-collateral.json",
        vm_policy="/etc/modelyo-ca/vm-policy.json",
    )
    assert m["sgx"]["allowed_files"] == [
        "file:/var/lib/modelyo-ca/",
        "file:/etc/modelyo-ca/collateral.json",
        "file:/etc/modelyo-ca/vm-collateral.json",
    ]
    # The initial VM policy grants keys: it is measured, not read from the host.
    assert "file:/etc/modelyo-ca/vm-policy.json" in uris(m["sgx"]["trusted_files"])
    args = ca_args(m)
    assert option_values(args, "--vm-policy") == ["/etc/modelyo-ca/vm-policy.json"]
    assert option_values(args, "--vm-collateral") == ["/etc/modelyo-ca/vm-collateral.json"]
    assert [mount["path"] for mount in m["fs"]["mounts"]].count("/etc/modelyo-ca") == 1


def test_isv_product_id_and_svn_come_from_variables(gramine_env: jinja2.Environment) -> None:
    m = render(gramine_env)
    assert (m["sgx"]["isvprodid"], m["sgx"]["isvsvn"]) == (1, 1)
    m = render(gramine_env, isvprodid="7", isvsvn="12")
    assert (m["sgx"]["isvprodid"], m["sgx"]["isvsvn"]) == (7, 12)


def test_enclave_memory_and_threads(gramine_env: jinja2.Environment) -> None:
    sgx = render(gramine_env)["sgx"]
    size = sgx["enclave_size"]
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    size_bytes = int(size[:-1]) * units[size[-1]]
    assert size_bytes & (size_bytes - 1) == 0, f"{size} is not a power of two"
    assert size_bytes >= 2**30
    # uvicorn's loop, AnyIO's 40 workers, asyncio's executor (up to 32) and Gramine's helpers.
    assert sgx["max_threads"] >= 1 + 40 + 32 + 3
    assert sgx["edmm_enable"] is False
    m = render(gramine_env, enclave_size="2G", max_threads="128")
    assert (m["sgx"]["enclave_size"], m["sgx"]["max_threads"]) == ("2G", 128)


def test_only_keys_gramine_knows(gramine_env: jinja2.Environment) -> None:
    m = render(gramine_env, vm_policy="/etc/modelyo-ca/vm-policy.json", hosts="a.example")
    assert set(m) <= set(GRAMINE_KEYS), set(m) - set(GRAMINE_KEYS)
    for section, keys in m.items():
        assert set(keys) <= GRAMINE_KEYS[section], (section, set(keys) - GRAMINE_KEYS[section])
    # gramine-manifest adds loader.entrypoint (the LibOS) and its trusted-file entry itself;
    # Gramine 1.9 rejects the old string form.
    assert "entrypoint" not in m["loader"]
    for mount in m["fs"]["mounts"]:
        assert mount["path"].startswith("/")
        assert mount.get("type", "chroot") in {"chroot", "tmpfs"}
        assert mount.get("type") == "tmpfs" or mount["uri"].startswith("file:/")


def test_values_are_quoted_not_spliced(gramine_env: jinja2.Environment) -> None:
    hostile = '/srv/ca "state"\nsgx.debug = true'
    m = render(gramine_env, state_dir=hostile)
    assert m["sgx"]["debug"] is False
    assert option_values(ca_args(m), "--state-dir") == [hostile]


@pytest.mark.parametrize(
    ("defines", "problem"),
    [
        ({"isvprodid": "x"}, "isvprodid"),
        ({"isvsvn": "70000"}, "isvsvn"),
        ({"collateral": ""}, "collateral_is_required"),
        ({"state_dir": "relative/state"}, "state_dir_must_be_an_absolute_path"),
        ({"listen": "8443"}, "listen_must_be_HOST_colon_PORT"),
        ({"hosts": "--platform"}, "hosts_must_be"),
        ({"max_threads": "2"}, "max_threads"),
        ({"vm_policy": "/var/lib/modelyo-ca/policy.json"}, "vm_policy_must_not_be_inside"),
        ({"state_dir": os.path.dirname(os.__file__)}, "must_not_share_directories"),
        ({"collateral": "/tmp/collateral.json"}, "must_not_share_directories"),
        ({"python_libs": "/tmp/py/libpython3.11.so"}, "must_not_live_under_tmp"),
    ],
)
def test_bad_input_fails_the_render(
    gramine_env: jinja2.Environment, defines: dict[str, str], problem: str
) -> None:
    with pytest.raises(jinja2.UndefinedError, match=problem):
        render_text(gramine_env, **defines)


def test_an_interpreter_without_modelyo_is_refused(tmp_path: Path) -> None:
    # `-S`: the same interpreter with its stdlib only, as a bare system python would be.
    bare = tmp_path / "python-bare"
    bare.write_text(f'#!/bin/sh\nexec "{ENTRYPOINT}" -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(jinja2.UndefinedError, match="modelyo_is_not_importable"):
        render_text(make_gramine_env(), ca_python=str(bare))


def test_makefile_passes_only_variables_the_template_reads(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        reason = "make is not installed; the Makefile's variables were not checked"
        print(reason)
        pytest.skip(reason)
    ast = jinja2.Environment().parse(TEMPLATE.read_text())
    template_vars = {
        name
        for name in jinja2.meta.find_undeclared_variables(ast)
        if not name.startswith("ERROR_") and name not in {"gramine", "python"}
    }
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(HERE), "manifest", f"CA_PYTHON={CA_PYTHON}", f"BUILD={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout
    passed = set(re.findall(r"-D(\w+)=", dry_run))
    # A misspelt -D would be ignored silently by Jinja and leave the default in the manifest.
    assert passed <= template_vars, passed - template_vars
    # Resource sizes keep the template's reasoned defaults unless one passes them on purpose.
    assert template_vars - passed == {"enclave_size", "max_threads"}
    assert f"-Dentrypoint='{ENTRYPOINT}'" in dry_run


def test_gramine_manifest_renders_the_template() -> None:
    tool = shutil.which("gramine-manifest")
    if tool is None:
        reason = (
            "gramine-manifest is not on PATH (Gramine has no Debian or PyPI package here); "
            "the template was rendered with the Jinja stand-in only"
        )
        print(reason)
        pytest.skip(reason)
    if not CA_ENCLAVE_PRESENT:
        pytest.skip("ca_enclave/ is not in this tree yet; gramine-manifest would refuse it")
    out = subprocess.run(
        [
            tool,
            f"-Dca_python={CA_PYTHON}",
            f"-Dentrypoint={ENTRYPOINT}",
            f"-Dpython_libs={python_libs(ENTRYPOINT)}",
            "-Dhosts=ca.example.com",
            str(TEMPLATE),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout
    m = tomllib.loads(out)
    assert m["loader"]["entrypoint"]["uri"].endswith("libsysdb.so")
    assert m["sgx"]["debug"] is False and m["sgx"]["remote_attestation"] == "dcap"
    assert option_values(ca_args(m), "--host") == ["ca.example.com"]
    assert "insecure__use_cmdline_argv" not in m["loader"]

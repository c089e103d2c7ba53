"""The /modelyo folders of every container: encryption and decryption served by the agent.

Each container gets its own folder on tmpfs, `<root>/<token>/`, owned by root with mode 0700:

    enc_in/ enc_out/ dec_in/ dec_out/   bind-mounted at /modelyo/... (owned by the container's
                                        user, mode 0700, so only it and the agent reach them)
    work/                               the agent's private staging area (root, 0700)

One inotify watcher serves every container. A file closed after writing (IN_CLOSE_WRITE) or
renamed into an `_in` folder (IN_MOVED_TO) is queued; a worker pool takes queued files round
robin across containers (so one container's thousand files do not starve another's one). A
worker moves the input into `work/` (the container can no longer touch that name), encrypts or
decrypts it there with the container's key (`modelyo.encryption`, nothing re-implemented), gives
the result to the container's user and renames it into the `_out` folder under the same name: it
appears whole or not at all. A failure writes `NAME.error` the same way and leaves no output.

A container may use only the key id fixed when it was created: its key source refuses every
other id, so a file encrypted under another container's key id fails with NAME.error. The root
must be on tmpfs (checked), so plaintext never reaches a disk; the VM has no swap.

Conventions shared with the in-container helper (`modelyo.incontainer`): names starting with "."
are never taken (writers stage under them); only regular files are processed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import select
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import inotify_simple

from modelyo.encryption import KeySource, ReleasedKey, check_key_id, decrypt_file, encrypt_file
from modelyo.errors import ConfigError, EncryptionError, KeyUnavailableError
from modelyo.incontainer import DEFAULT_ROOT, ERROR_SUFFIX, FOLDERS, is_request_name

log = logging.getLogger(__name__)

CONTAINER_ROOT = DEFAULT_ROOT
WORK = "work"
DIRECTIONS = ("enc", "dec")
TMPFS_TYPES = frozenset({"tmpfs", "ramfs"})
TOKEN_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
# How long the current version of a container's key is reused before the source is asked again
# (a rotation shows up within this time; exact versions never change and stay cached).
DEFAULT_KEY_TTL = 60.0
# A rescan (after a restart or an event-queue overflow) has no close event to go by: it leaves
# files modified within this many seconds for a later pass, as they may still be being written.
SETTLE_SECONDS = 1.0
# Waits for a removed container's jobs in flight before its folders are deleted.
REMOVE_WAIT = 30.0

_WATCH_MASK = (
    inotify_simple.flags.CLOSE_WRITE
    | inotify_simple.flags.MOVED_TO
    | inotify_simple.flags.CREATE
    | inotify_simple.flags.ONLYDIR
    | inotify_simple.flags.DONT_FOLLOW
)


# --- pure helpers -------------------------------------------------------------------------------


def mount_fstype(mountinfo: str, path: str) -> str:
    """The type of the filesystem holding the absolute, resolved `path`, from the text of
    /proc/self/mountinfo (the mount point that is the longest prefix wins; later lines, which
    are mounted on top, win ties)."""
    best, best_len = "", -1
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        point = _unescape_mount(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best_len:
            best, best_len = right.split()[0], len(point)
    return best


def _unescape_mount(text: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The filesystem type ("tmpfs", "ext4", ...) holding `path` ("" if unknown)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ""
    return mount_fstype(text, os.path.realpath(path))


def error_text(
    direction: str, name: str, exc: BaseException, hidden: Iterable[str] = (), *, taken: bool = True
) -> str:
    """The readable content of NAME.error: what failed and why, in the container's terms.

    Host paths in the message (`hidden`) are replaced by the container's view of the input;
    `taken` says the input was removed from the `_in` folder.
    """
    action = "encrypt" if direction == "enc" else "decrypt"
    shown = f"{CONTAINER_ROOT}/{direction}_in/{name}"
    if isinstance(exc, EncryptionError):
        reason = str(exc)
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = f"internal error ({type(exc).__name__}); the agent's log has the details"
    for path in hidden:
        reason = reason.replace(path, shown)
    reason = reason.removeprefix(f"{shown}: ")  # the library names the file too
    then = "the input was taken and removed: put a corrected file again" if taken else "it was left"
    return f"could not {action} {shown}: {reason}\n({type(exc).__name__}; {then})\n"


# --- keys -----------------------------------------------------------------------------------


class BoundKeys:
    """A `KeySource` for one container: only its key id, whatever the file asks for.

    The current version is cached for `ttl` seconds, exact versions for good, so many small
    files do not each cost a round trip to the CA.
    """

    def __init__(self, source: KeySource, key_id: str, *, ttl: float = DEFAULT_KEY_TTL) -> None:
        self._source = source
        self.key_id = check_key_id(key_id)
        self._ttl = ttl
        self._current: tuple[float, ReleasedKey] | None = None
        self._versions: dict[int, ReleasedKey] = {}
        self._lock = threading.Lock()

    def key(self, key_id: str, version: int | None) -> ReleasedKey:
        """See `KeySource.key`; any other key id than the container's is refused."""
        if key_id != self.key_id:
            raise KeyUnavailableError(
                f"this container may use only key id {self.key_id!r}, and the file is encrypted "
                f"under key id {key_id!r}; decrypt it in a container created with key id "
                f"{key_id!r}"
            )
        now = time.monotonic()
        with self._lock:
            if version is None and self._current and now - self._current[0] < self._ttl:
                return self._current[1]
            if version is not None and version in self._versions:
                return self._versions[version]
        released = self._source.key(key_id, version)
        with self._lock:
            self._versions[released.version] = released
            if version is None:
                self._current = (now, released)
        return released


# --- the per-container folders ------------------------------------------------------------------


@dataclass
class ContainerDirs:
    """One container's folders: `base` on the agent's side, mounted at /modelyo in it."""

    token: str
    key_id: str
    base: Path
    keys: BoundKeys = field(repr=False)
    uid: int = 0
    gid: int = 0
    wds: dict[int, str] = field(default_factory=dict, repr=False)

    def host_path(self, folder: str) -> Path:
        """The agent-side path of `folder` (enc_in, enc_out, dec_in, dec_out or work)."""
        return self.base / folder

    def mounts(self) -> dict[str, str]:
        """Container path -> host path, for the four bind mounts."""
        return {f"{CONTAINER_ROOT}/{f}": str(self.base / f) for f in FOLDERS}


# --- the queue ---------------------------------------------------------------------------------

_Job = tuple[str, str, str]  # (token, direction, name)
_QUEUED, _RUNNING, _AGAIN = 1, 2, 3


class _Scheduler:
    """Jobs per container, served round robin; a name queued twice runs once, and a name that
    changes while its job runs is queued again, so two jobs never race on one name."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._turns: deque[str] = deque()
        self._state: dict[_Job, int] = {}
        self._running: dict[str, int] = {}
        self._closed = False

    def put(self, job: _Job) -> None:
        with self._cv:
            state = self._state.get(job)
            if state is None:
                self._enqueue(job)
            elif state == _RUNNING:
                self._state[job] = _AGAIN

    def _enqueue(self, job: _Job) -> None:
        self._state[job] = _QUEUED
        queue = self._queues.setdefault(job[0], deque())
        if not queue:
            self._turns.append(job[0])
        queue.append(job)
        self._cv.notify()

    def get(self) -> _Job | None:
        """The next job (None once closed); blocks while there is none."""
        with self._cv:
            while not self._turns and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            token = self._turns.popleft()
            queue = self._queues[token]
            job = queue.popleft()
            if queue:
                self._turns.append(token)  # back of the line: the next container goes first
            self._state[job] = _RUNNING
            self._running[token] = self._running.get(token, 0) + 1
            return job

    def done(self, job: _Job) -> None:
        with self._cv:
            self._running[job[0]] -= 1
            if self._state.pop(job, None) == _AGAIN:
                self._enqueue(job)
            self._cv.notify_all()

    def drop(self, token: str, *, wait: float) -> None:
        """Forget `token`'s queued jobs and wait up to `wait` s for its running ones."""
        with self._cv:
            for job in self._queues.pop(token, ()):
                self._state.pop(job, None)
            with contextlib.suppress(ValueError):
                self._turns.remove(token)
            for job in [j for j, s in self._state.items() if j[0] == token]:
                self._state[job] = _RUNNING  # never queued again
            self._cv.wait_for(lambda: not self._running.get(token), timeout=wait)

    def idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._state, timeout=timeout)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


# --- the service -------------------------------------------------------------------------------


class CryptDirs:
    """The /modelyo folders service for every container of one agent.

    `root` (created 0700 if missing) must be on tmpfs unless `require_tmpfs` is False, and must
    belong to this agent alone: `tokens()` lists what is there. `keys` releases the keys (the CA
    in production); `workers` threads encrypt and decrypt.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        keys: KeySource,
        *,
        workers: int = max(2, os.cpu_count() or 1),
        require_tmpfs: bool = True,
        key_ttl: float = DEFAULT_KEY_TTL,
    ) -> None:
        self.root = Path(root)
        self._keys = keys
        self._key_ttl = key_ttl
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the folder for the containers' /modelyo folders {self.root}: "
                f"{exc.strerror}; give a writable folder on tmpfs (e.g. under /dev/shm)"
            ) from None
        kind = filesystem_type(self.root)
        if require_tmpfs and kind not in TMPFS_TYPES:
            raise ConfigError(
                f"{self.root} is on {kind or 'an unknown filesystem'}, not tmpfs: decrypted "
                "plaintext would reach a disk; put the containers' /modelyo folders under "
                "/dev/shm or on a tmpfs the agent mounts"  # noqa: S108 - advice, not a path used
            )
        os.chmod(self.root, 0o700)
        self._dirs: dict[str, ContainerDirs] = {}
        self._wds: dict[int, tuple[str, str]] = {}  # watch -> (token, direction)
        self._lock = threading.RLock()
        self._scheduler = _Scheduler()
        self._inotify = inotify_simple.INotify()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._rescans: dict[str, threading.Timer] = {}
        self._threads = [threading.Thread(target=self._watch, name="cryptdirs-watch", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"cryptdirs-worker-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def check_key(self, key_id: str) -> None:
        """Raise KeyUnavailableError unless the key source releases the current version of
        `key_id` (cached, as for the folders' own requests)."""
        self._keys.key(key_id, None)

    # --- lifecycle of one container's folders ---

    def open(self, token: str, key_id: str) -> ContainerDirs:
        """Create (or find again, after a restart) the folders of `token` and serve them with
        key id `key_id`. Files already waiting in its `_in` folders are processed."""
        if not TOKEN_RE.match(token):
            raise ValueError(f"a folder token is [a-z0-9-], 1-64 characters, not {token!r}")
        with self._lock:
            self._check_open()
            existing = self._dirs.get(token)
            if existing is not None:
                if existing.key_id != key_id:
                    raise ValueError(f"{token} is served with key id {existing.key_id!r}")
                return existing
            base = self.root / token
            base.mkdir(mode=0o700, exist_ok=True)
            os.chmod(base, 0o700)
            dirs = ContainerDirs(
                token, key_id, base, BoundKeys(self._keys, key_id, ttl=self._key_ttl)
            )
            for folder in (*FOLDERS, WORK):
                path = base / folder
                path.mkdir(mode=0o700, exist_ok=True)
                st = path.lstat()
                if not stat.S_ISDIR(st.st_mode):
                    raise ValueError(f"{path} is not a folder; remove it")
                if folder != WORK:
                    dirs.uid, dirs.gid = st.st_uid, st.st_gid  # kept across agent restarts
            self._clear_work(base / WORK)
            for direction in DIRECTIONS:
                wd = self._inotify.add_watch(base / f"{direction}_in", _WATCH_MASK)
                self._wds[wd] = (token, direction)
                dirs.wds[wd] = direction
            self._dirs[token] = dirs
        self._rescan(token)
        return dirs

    def set_owner(self, token: str, uid: int, gid: int) -> None:
        """Give the four folders of `token` to the container's user (uid, gid); results are
        given to it too."""
        with self._lock:
            dirs = self._require(token)
            for folder in FOLDERS:
                os.chown(dirs.base / folder, uid, gid, follow_symlinks=False)
                os.chmod(dirs.base / folder, 0o700, follow_symlinks=False)
            dirs.uid, dirs.gid = uid, gid

    def get(self, token: str) -> ContainerDirs | None:
        """The folders of `token` if they are served."""
        with self._lock:
            return self._dirs.get(token)

    def tokens(self) -> list[str]:
        """The tokens with folders under the root (served or not)."""
        return sorted(p.name for p in self.root.iterdir() if TOKEN_RE.match(p.name))

    def remove(self, token: str) -> None:
        """Stop serving `token` and delete its folders with everything in them."""
        with self._lock:
            dirs = self._dirs.pop(token, None)
            if dirs is not None:
                for wd in dirs.wds:
                    self._wds.pop(wd, None)
                    with contextlib.suppress(OSError):  # already gone with its folder
                        self._inotify.rm_watch(wd)
            timer = self._rescans.pop(token, None)
        if timer is not None:
            timer.cancel()
        self._scheduler.drop(token, wait=REMOVE_WAIT)
        if TOKEN_RE.match(token):
            _remove_tree(self.root / token)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no file is queued or being processed; False on timeout."""
        return self._scheduler.idle(timeout)

    def close(self) -> None:
        """Stop the watcher and the workers (jobs in progress finish); the folders stay."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for timer in self._rescans.values():
                timer.cancel()
        self._scheduler.close()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout=REMOVE_WAIT)
        self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> CryptDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the /modelyo folder service is closed")

    def _require(self, token: str) -> ContainerDirs:
        dirs = self._dirs.get(token)
        if dirs is None:
            raise KeyError(f"no folders are served for {token}")
        return dirs

    @staticmethod
    def _clear_work(work: Path) -> None:
        # Leftovers of jobs interrupted by a restart: their inputs were taken, none finished.
        for entry in work.iterdir():
            _remove_tree(entry)

    # --- finding work ---

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if self._closed or any(fd == self._wake_r for fd, _ in ready):
                return
            try:
                events = self._inotify.read(timeout=0)
            except OSError:
                log.exception("reading inotify events failed")
                continue
            for event in events:
                self._on_event(event)

    def _on_event(self, event: inotify_simple.Event) -> None:
        flags = inotify_simple.flags
        if event.mask & flags.Q_OVERFLOW:
            log.warning("inotify queue overflowed: rescanning every /modelyo folder")
            with self._lock:
                tokens = list(self._dirs)
            for token in tokens:
                self._rescan(token)
            return
        with self._lock:
            where = self._wds.get(event.wd)
        if where is None or not is_request_name(event.name):
            return
        token, direction = where
        if event.mask & flags.CREATE and not event.mask & flags.ISDIR:
            # A new regular file waits for its close. A hard link to a finished file, a
            # symlink, a FIFO or a device never closes, so they are taken now.
            dirs = self.get(token)
            try:
                st = os.lstat(dirs.base / f"{direction}_in" / event.name) if dirs else None
            except OSError:
                return
            if st is None or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
                return
        self._scheduler.put((token, direction, event.name))

    def _rescan(self, token: str) -> None:
        """Queue what is waiting in `token`'s `_in` folders (no events to go by: used after a
        restart or an overflow). Files changed very recently get another look later."""
        dirs = self.get(token)
        if dirs is None:
            return
        later = False
        now = time.time()
        for direction in DIRECTIONS:
            try:
                entries = list(os.scandir(dirs.base / f"{direction}_in"))
            except OSError:
                continue
            for entry in entries:
                if not is_request_name(entry.name):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if now - mtime < SETTLE_SECONDS:
                    later = True
                else:
                    self._scheduler.put((token, direction, entry.name))
        if later:
            with self._lock:
                if self._closed or token not in self._dirs:
                    return
                old = self._rescans.pop(token, None)
                if old is not None:
                    old.cancel()
                timer = threading.Timer(SETTLE_SECONDS, self._rescan, args=(token,))
                timer.daemon = True
                self._rescans[token] = timer
                timer.start()

    # --- doing the work ---

    def _work(self) -> None:
        while (job := self._scheduler.get()) is not None:
            try:
                dirs = self.get(job[0])
                if dirs is not None:
                    process(dirs, job[1], job[2])
            except Exception:
                log.exception("processing %s failed", job)
            finally:
                self._scheduler.done(job)


def process(dirs: ContainerDirs, direction: str, name: str, *, fsync: bool = False) -> bool:
    """Take `name` from `dirs`' `<direction>_in` and put its result (or NAME.error) into
    `<direction>_out`. Returns True on success, False when an error file was written or there
    was nothing to take.

    Every step that touches a container-owned folder is a rename or an unlink, which never
    follow symbolic links; reading and writing happen in the agent's private `work` folder.
    """
    in_dir = dirs.base / f"{direction}_in"
    out_dir = dirs.base / f"{direction}_out"
    work = dirs.base / WORK
    tag = secrets.token_hex(8)
    staged, result, report = work / f"in-{tag}", work / f"out-{tag}", work / f"err-{tag}"
    try:
        entry = os.lstat(in_dir / name)
    except FileNotFoundError:
        return False  # already taken (a duplicate event) or removed by the container
    if stat.S_ISDIR(entry.st_mode):
        # A folder stays where it is: moving a tree the container still writes into is no help.
        _answer_error(dirs, direction, name, _folder_error(), report, (), taken=False)
        return False
    try:
        os.rename(in_dir / name, staged)
    except FileNotFoundError:
        return False
    try:
        st = os.lstat(staged)
        if not stat.S_ISREG(st.st_mode):
            raise EncryptionError(f"{name} is not a regular file (a link, FIFO or device)")
        if direction == "enc":
            encrypt_file(staged, result, dirs.keys, dirs.key_id, fsync=fsync)
        else:
            decrypt_file(staged, result, dirs.keys, fsync=fsync)
        _give(result, dirs)
        os.rename(result, out_dir / name)
    except Exception as exc:
        _discard(result)
        hidden = (str(staged), str(result), str(work))
        _answer_error(dirs, direction, name, exc, report, hidden)
        if not isinstance(exc, EncryptionError | OSError):
            log.exception("processing %s/%s_in/%s failed", dirs.token, direction, name)
        return False
    finally:
        _discard(staged)
    _unlink_quietly(out_dir / (name + ERROR_SUFFIX))
    return True


def _folder_error() -> EncryptionError:
    return EncryptionError("it is a folder; put files one at a time (or a tar of the folder)")


def _answer_error(
    dirs: ContainerDirs,
    direction: str,
    name: str,
    exc: BaseException,
    report: Path,
    hidden: Iterable[str],
    *,
    taken: bool = True,
) -> None:
    """Put NAME.error (whole, via a rename) into the `_out` folder and drop a stale NAME."""
    out_dir = dirs.base / f"{direction}_out"
    text = error_text(direction, name, exc, hidden, taken=taken)
    try:
        fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        _give(report, dirs)
        _unlink_quietly(out_dir / name)
        os.rename(report, out_dir / (name + ERROR_SUFFIX))
    except OSError as err:
        _discard(report)
        log.warning("cannot write %s%s for %s: %s", name, ERROR_SUFFIX, dirs.token, err)
    else:
        log.info("%s/%s_in/%s: %s", dirs.token, direction, name, text.splitlines()[0])


def _give(path: Path, dirs: ContainerDirs) -> None:
    """Make `path` the container user's (root keeps files for a root container)."""
    if (dirs.uid, dirs.gid) != (os.geteuid(), os.getegid()):
        os.chown(path, dirs.uid, dirs.gid, follow_symlinks=False)
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    os.chmod(path, mode | 0o600, follow_symlinks=False)  # the owner can always read and remove


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _remove_tree(path)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        os.unlink(path)


def _remove_tree(path: Path) -> None:
    """Remove a file or a whole tree without following symbolic links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, onerror=_rmtree_retry)
    else:
        os.unlink(path)


def _rmtree_retry(func: Callable[..., object], path: str, _exc: object) -> None:
    # A folder the container made read-only: make it writable and try once more.
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
    try:
        func(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, exc)

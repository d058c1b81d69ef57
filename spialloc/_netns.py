"""Network namespaces: open sockets in a target namespace, make throwaway ones.

A netlink socket belongs to the namespace its creator was in when it was made,
and the capability check for ALLOCSPI is done against that namespace.  Setting
the namespace is per thread on Linux, so sockets for another namespace are made
in a short-lived thread that enters it (``setns``), which leaves every other
thread of the daemon where it was and needs no fork.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import os
import signal
import socket
import stat
import struct
import threading
from typing import Callable, NoReturn, TypeVar, Union

from . import _lifecycle
from ._lifecycle import InertLock, close_copy
from .errors import NamespaceError, NetlinkError, out_of_fds

T = TypeVar("T")

NetnsSpec = Union[None, str, "os.PathLike[str]", int, "Namespace"]

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NETNS_RUN_DIR = "/run/netns"
#: ioctl(NS_GET_NSTYPE) (Linux 4.11): only nsfs answers it, with the CLONE_NEW* type.
NS_GET_NSTYPE = 0xB703
#: Above any fd number (close_range(2) stops at the highest open one).
_FD_LIMIT = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a regular file"


def _check_netns(fd: int, what: str) -> None:
    """Refuse anything but a network namespace up front: setns would say only
    EINVAL later, from whichever thread first needs a socket."""
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = _file_kind(os.fstat(fd).st_mode)
        raise NamespaceError(errno.EINVAL, f"{what} is not a network namespace: it is {kind}") from None
    if nstype != CLONE_NEWNET:
        raise NamespaceError(errno.EINVAL, f"{what} is not a network namespace: it is another kind of namespace")


def _setns_thread(fd: int) -> None:
    # libc's setns, not pyroute2's: importing pyroute2 on first use needs file
    # descriptors (and 0.2 s), so out of them it failed as "cannot enter".
    # CLONE_NEWNET: the kernel refuses any other kind of namespace.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _new_socket(family: int, kind: int, proto: int, where: str) -> socket.socket:
    try:
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    except OSError as exc:
        doing = f"socket in {where}"
        raise out_of_fds(exc.errno, doing) or NetlinkError(exc.errno or errno.EIO, None, doing) from None


def _run_in_thread(fn: Callable[..., T], *args: object) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=body, name="spialloc-netns", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


class Namespace:
    """A network namespace held open by a file descriptor (or the current one).

    ``Namespace.current()`` makes sockets in the caller's own namespace;
    ``Namespace.open(spec)`` resolves a name from ``ip netns`` (``/run/netns``),
    a path such as ``/proc/PID/ns/net``, or an open fd (duplicated, so the
    caller may close theirs); ``Namespace.isolated()`` makes a fresh one that
    disappears with the last socket and handle.
    """

    def __init__(self, fd: int | None, description: str, helper: _UserNsHelper | None = None) -> None:
        self.fd = fd
        self.description = description
        self._helper = helper
        # A closed handle must not fall back to fd None, "the current namespace".
        self.closed = False

    @classmethod
    def current(cls) -> Namespace:
        """The caller's own network namespace (no fd is opened)."""
        return cls(None, "current network namespace")

    @classmethod
    def open(cls, spec: NetnsSpec) -> Namespace:
        """A handle on ``spec``: None (the current namespace), a name from
        ``ip netns`` (``/run/netns/NAME``), a path such as
        ``/proc/PID/ns/net``, an open fd (duplicated) or a Namespace (a new
        handle on it).  Raises ``NamespaceError`` if it names no network
        namespace, ``ResourceError`` when out of file descriptors."""
        if spec is None:
            return cls.current()
        if isinstance(spec, Namespace):
            return spec.dup()
        if isinstance(spec, bool) or not isinstance(spec, (int, str, os.PathLike)):
            raise NamespaceError(f"netns={spec!r}: give a name, a path or an open fd")
        if isinstance(spec, int):
            if not 0 <= spec < 1 << 31:
                raise NamespaceError(f"netns={spec!r} is not a file descriptor")
            try:
                fd = os.dup(spec)
            except OSError as exc:
                raise out_of_fds(exc.errno, f"netns fd {spec}") or NamespaceError(
                    exc.errno, f"netns fd {spec}: {exc.strerror}"
                ) from None
            return cls._checked(fd, f"netns fd {spec}", f"netns fd {spec}")
        path = os.fspath(spec)
        if not isinstance(path, str) or not path or "\0" in path:
            raise NamespaceError(f"netns={spec!r}: give a name, a path or an open fd")
        if "/" not in path:
            path = os.path.join(NETNS_RUN_DIR, path)
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise out_of_fds(exc.errno, f"network namespace {spec!r}") or NamespaceError(
                exc.errno, f"network namespace {spec!r} ({path}): {exc.strerror}"
            ) from None
        named = f"netns {spec!r}" if path == spec else f"netns {spec!r} ({path})"
        return cls._checked(fd, f"network namespace {spec!r}", named)

    @classmethod
    def _checked(cls, fd: int, description: str, named: str) -> Namespace:
        try:
            _check_netns(fd, named)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, description)

    @classmethod
    def isolated(cls) -> Namespace:
        """A fresh, empty network namespace owned by this process.

        As root (CAP_SYS_ADMIN) it is made with unshare(CLONE_NEWNET) in a
        helper thread.  Without that capability, a child process makes a user
        namespace plus a network namespace (what ``unshare -Urn`` does) and
        hands sockets back over a Unix socket: only a process inside the new
        user namespace can make sockets that pass the CAP_NET_ADMIN check.
        """

        def unshare_net() -> int:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

        doing = "isolated network namespace"
        try:
            fd = _run_in_thread(unshare_net)
            return cls(fd, "isolated network namespace")
        except OSError as exc:
            first = exc
        # Out of fds is no reason to try a user namespace instead.
        if (full := out_of_fds(first.errno, doing)) is not None:
            raise full from None
        try:
            helper = _UserNsHelper()
        except OSError as exc:
            raise out_of_fds(exc.errno, doing) or NamespaceError(
                exc.errno,
                f"cannot make an isolated network namespace: unshare: {first.strerror}; "
                f"user namespace: {exc.strerror} (are unprivileged user namespaces disabled?)",
            ) from None
        return cls(None, "isolated network namespace (user namespace)", helper)

    def _check_open(self) -> None:
        if self.closed:
            raise NamespaceError(errno.EBADF, f"{self.description}: the handle is closed")

    def dup(self) -> Namespace:
        """Another handle on the same namespace, closed independently."""
        self._check_open()
        if self._helper is not None:
            self._helper.refs += 1
            return Namespace(None, self.description, self._helper)
        if self.fd is None:
            return Namespace(None, self.description)
        try:
            return Namespace(os.dup(self.fd), self.description)
        except OSError as exc:
            raise out_of_fds(exc.errno, self.description) or NamespaceError(
                exc.errno, f"{self.description}: {exc.strerror}"
            ) from None

    def identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the namespace: equal for every handle on the
        same namespace, whoever opened it and how (the kernel's nsfs inode).
        None when it cannot be told (no /proc): then nothing is shared."""
        self._check_open()
        try:
            if self.fd is not None:
                st = os.fstat(self.fd)
            elif self._helper is not None:
                st = os.stat(f"/proc/{self._helper.pid}/ns/net")
            else:
                st = os.stat("/proc/thread-self/ns/net")
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def socket(self, family: int, kind: int, proto: int) -> socket.socket:
        """A socket made inside the namespace (setns in a helper thread, or
        the user-namespace helper process).  Raises ``NamespaceError``,
        ``ResourceError``, or the OSError the socket call gave."""
        self._check_open()
        if self._helper is not None:
            return self._helper.socket(family, kind, proto)
        if self.fd is None:
            return _new_socket(family, kind, proto, self.description)
        fd = self.fd

        def make() -> socket.socket:
            try:
                _setns_thread(fd)
            except OSError as exc:
                raise NamespaceError(exc.errno, f"cannot enter {self.description}: {exc.strerror}") from None
            return _new_socket(family, kind, proto, self.description)

        return _run_in_thread(make)

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call ``fn(*args)`` in a thread that is inside this namespace (e.g. to
        read its sysctls under /proc/sys/net, which follow the caller's netns)."""
        self._check_open()
        if self.fd is None:
            if self._helper is not None:
                raise NamespaceError("cannot run code inside a user-namespace isolated namespace")
            return fn(*args)
        fd = self.fd

        def body() -> T:
            _setns_thread(fd)
            return fn(*args)

        return _run_in_thread(body)

    def close(self) -> None:
        """Close the handle; a namespace made by ``isolated()`` ends with its last handle."""
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._helper is not None:
            self._helper.refs -= 1
            if self._helper.refs == 0:
                self._helper.close()
            self._helper = None

    def close_copy(self) -> None:
        """In a fork child, for an inherited allocator's namespace: close this
        process's copy of the fd and leave the helper (the parent's) alone."""
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._helper = None

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Namespace {self.description}>"


class _UserNsHelper:
    """A child process inside a fresh user + network namespace that makes
    sockets on request and passes them back with SCM_RIGHTS.

    The child keeps only its end of the channel and stdio on /dev/null: any
    other fd of the parent's that it held would hide EOF from the parent's
    readers (a pipe, or another helper's channel, whose close() would then
    wait forever).  A thread reaps it as soon as it exits, so it is never left
    a zombie, and from then on every request raises NamespaceError saying how
    it ended."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ready_r, ready_w = os.pipe()
        except BaseException:
            parent.close()
            child.close()
            raise
        try:
            pid = os.fork()
        except BaseException:
            for s in (parent, child):
                s.close()
            os.close(ready_r)
            os.close(ready_w)
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            _helper_main(child.fileno(), ready_w)
        child.close()
        os.close(ready_w)
        self.pid = pid
        self.chan = parent
        self.refs = 1
        self.lock: threading.Lock | InertLock = threading.Lock()
        self.status: int | None = None  # waitpid status once reaped
        self._reaper = threading.Thread(target=self._reap, name="spialloc-userns-reaper", daemon=True)
        self._reaper.start()
        ready = b""
        try:
            # Up to EOF: the helper closes its end once it has answered, so
            # after this it holds nothing but its channel.
            # ``while True``, not ``while chunk := ...``: CPython 3.13 compiles a
            # conditional loop's back edge outside this try (gh-130279).
            while True:
                chunk = os.read(ready_r, 4)
                if not chunk:
                    break
                ready += chunk
        finally:
            os.close(ready_r)
        if len(ready) != 4:
            self.close()
            raise NamespaceError(errno.ESRCH, f"the helper process {self._ended()} before it was ready")
        err = struct.unpack("=i", ready)[0]
        if err:
            self.close()
            raise OSError(err, os.strerror(err))
        _lifecycle.track(self)

    def _after_fork(self, parent: int) -> None:
        # One channel, one helper: a child's requests would interleave with
        # the parent's and take its replies (and their fds).
        self.lock = InertLock("Namespace", parent)
        close_copy(self.chan)

    def _reap(self) -> None:
        try:
            self.status = os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            pass  # reaped by someone else: SIGCHLD ignored, or the application's waitpid(-1)

    def _ended(self) -> str:
        """How the helper ended, once its channel broke (it is exiting or gone)."""
        self._reaper.join(5)
        if self._reaper.is_alive():
            return "stopped answering"
        if self.status is None:
            return "exited (its status was collected elsewhere)"
        code = os.waitstatus_to_exitcode(self.status)
        return f"was killed by signal {-code} ({_signal_name(-code)})" if code < 0 else f"exited with status {code}"

    def _gone(self) -> NamespaceError:
        return NamespaceError(
            errno.ESRCH,
            f"the helper process (pid {self.pid}) of the isolated network namespace {self._ended()}; "
            "no more sockets can be made in that namespace",
        )

    def _ask(self, request: bytes) -> tuple[int, bytes, list[int]]:
        """One request, one reply: (errno, payload, passed fds)."""
        with self.lock:
            try:
                self.chan.send(request)
                msg, fds, flags, _ = socket.recv_fds(self.chan, 1 << 16, 1)
            except OSError:  # EPIPE or ECONNRESET: the helper is gone
                raise self._gone() from None
        if len(msg) < 4:  # EOF: the helper exited after reading the request
            for fd in fds:
                os.close(fd)
            raise self._gone()
        err = struct.unpack("=i", msg[:4])[0]
        if flags & socket.MSG_CTRUNC and not fds:
            # The kernel drops a passed fd it cannot install here: out of fds.
            err = errno.EMFILE
        return err, msg[4:], fds

    def sysctl(self, path: str, value: str | None) -> str:
        """Read (value None) or write a file under /proc/sys as the child sees it."""
        if value is None:
            err, reply, _ = self._ask(b"R" + path.encode())
        else:
            err, reply, _ = self._ask(b"W" + path.encode() + b"\0" + value.encode())
        if err:
            raise NamespaceError(err, f"{path} in isolated namespace: {os.strerror(err)}")
        return reply.decode()

    def socket(self, family: int, kind: int, proto: int) -> socket.socket:
        err, _, fds = self._ask(b"S" + struct.pack("=iii", family, kind | socket.SOCK_CLOEXEC, proto))
        if err or not fds:
            raise out_of_fds(err, "socket in isolated namespace") or NamespaceError(
                err, f"socket in isolated namespace: {os.strerror(err)}"
            )
        return socket.socket(fileno=fds[0])

    def close(self) -> None:
        self.chan.close()  # EOF ends the helper's loop
        self._reaper.join()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"


def _helper_main(chan_fd: int, ready_w: int) -> NoReturn:  # pragma: no cover - runs in the child
    code = 1
    try:
        # The parent's objects are still here; a cyclic-GC finalizer among
        # them could close an fd number this process has reused since.
        gc.disable()
        # A Ctrl-C at the parent's terminal is the parent's to handle; the
        # helper ends when its channel does.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        chan_fd, ready_w = _keep_only(chan_fd, ready_w)
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            os.write(ready_w, struct.pack("=i", ctypes.get_errno()))
            os._exit(1)
        os.write(ready_w, struct.pack("=i", 0))
        os.close(ready_w)
        chan = socket.socket(fileno=chan_fd)
        while True:
            req = chan.recv(1 << 16)
            if not req:
                break
            try:
                if req[:1] == b"S":
                    fam, kind, proto = struct.unpack("=iii", req[1:13])
                    s = socket.socket(fam, kind, proto)
                    socket.send_fds(chan, [struct.pack("=i", 0)], [s.fileno()])
                    s.close()
                elif req[:1] == b"R":
                    with open(req[1:].decode()) as f:
                        chan.send(struct.pack("=i", 0) + f.read().encode())
                else:  # b"W": path NUL value
                    path, _, value = req[1:].partition(b"\0")
                    with open(path.decode(), "w") as f:
                        f.write(value.decode())
                    chan.send(struct.pack("=i", 0))
            except OSError as exc:
                chan.send(struct.pack("=i", exc.errno or 1))
        code = 0
    except BaseException:
        code = 1
    os._exit(code)


def _keep_only(*keep: int) -> list[int]:  # pragma: no cover - runs in the helper
    """Close every fd but ``keep`` (moved above stdio) and stdio (on /dev/null)."""
    _close_all_but(0, 1, 2, *keep)  # first: the table may be full, as the parent's was
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3) for fd in keep]
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        if std != null:
            os.dup2(null, std)
    _close_all_but(0, 1, 2, *moved)
    return moved


def _close_all_but(*keep: int) -> None:  # pragma: no cover - runs in the helper
    low = 0
    for fd in sorted(set(keep)):
        if low < fd:  # os.closerange(0, 0) is close_range(0, UINT_MAX): every fd
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _FD_LIMIT)


def read_sysctl(ns: Namespace, name: str) -> str:
    path = "/proc/sys/" + name.replace(".", "/")
    if ns._helper is not None:
        return ns._helper.sysctl(path, None).strip()

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return str(ns.run(read))


def write_sysctl(ns: Namespace, name: str, value: object) -> None:
    path = "/proc/sys/" + name.replace(".", "/")
    if ns._helper is not None:
        ns._helper.sysctl(path, str(value))
        return

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    ns.run(write)

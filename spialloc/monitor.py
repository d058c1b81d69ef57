"""Kernel XFRM events: ACQUIRE (a packet needs an SA) and EXPIRE (a state died).

``Monitor`` subscribes to the multicast groups and yields typed events, as a
blocking iterator or an async iterator.  When the kernel drops events because
the socket buffer was full (ENOBUFS), the monitor does not die: it yields
``EventsLost`` carrying a fresh dump of the SAD so the daemon can resync.
"""

from __future__ import annotations

import asyncio
import errno
import warnings
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Union

from . import _lifecycle
from . import _wire as w
from ._lifecycle import close_copy
from ._model import (
    IPAddress,
    KernelState,
    Lifetime,
    Mode,
    Proto,
    Selector,
    check_int,
    mode_or_int,
    proto_or_int,
    unpack_address,
)
from ._netlink import XfrmSocket, wait_readable
from ._netns import Namespace, NetnsSpec
from .errors import ClosedError, DecodeError, ForkedError


@dataclass(frozen=True, slots=True)
class Template:
    """One SA a policy asks for (struct xfrm_user_tmpl).  Addresses of the
    unspecified kind (``0.0.0.0``) mean "the packet's own" (transport mode)."""

    dst: IPAddress
    src: IPAddress
    spi: int  # 0: any
    proto: Proto | int
    reqid: int
    mode: Mode | int
    share: int
    optional: bool  # "level use": the packet may go without this SA
    aalgos: int  # bitmasks of acceptable algorithms (all ones: any)
    ealgos: int
    calgos: int


@dataclass(frozen=True, slots=True)
class AcquirePolicy:
    """The policy whose template needs an SA (struct xfrm_userpolicy_info in
    the ACQUIRE, plus its XFRMA_POLICY_TYPE).

    ``dir`` is what the kernel writes there: ``OUT`` (1) for every ACQUIRE
    since Linux 4.14, as ACQUIREs come from output lookups.  The policy's
    own direction is in its ``index``: an index the kernel generated has the
    direction in its low three bits (0 in, 1 out, 2 fwd; 3-5 the same for
    socket policies), the rest a counter (daemons such as pyikev2 key on
    ``index >> 3``); an index given to NEWPOLICY by the user is kept as is."""

    index: int
    priority: int
    dir: int
    action: int  # 0 allow, 1 block
    flags: int
    share: int
    selector: Selector
    lifetime: Lifetime
    type: int | None = None  # XFRMA_POLICY_TYPE: 0 main, 1 sub; None: not sent


@dataclass(frozen=True, slots=True)
class Acquire:
    """XFRM_MSG_ACQUIRE: the kernel needs an SA and made an ACQ state for it.

    ``Allocator.allocate_for(event)`` gives that ACQ state its SPI: it takes
    every field binding needs from here (dst, src, proto, mode, reqid, mark,
    if_id, pcpu and seq) and refuses a second binding of the same ``seq``.

    ``dst``, ``src``, ``proto``: the ACQ state's; ``reqid`` and ``mode``:
    its template's (the first template for its protocol and destination);
    ``selector``: the flow that triggered it (the state's selector).  The
    rest is what the kernel sends with it: the policy's ``mark`` (value,
    mask) and ``if_id`` (None when the policy has none), the state's
    per-CPU id ``pcpu`` (Linux 6.13+), the ``policy`` itself, every one of
    its ``templates``, the algorithm masks of the triggering template, the
    security context (the string, None without one) and the offload device
    (ifindex, flags)."""

    seq: int
    dst: IPAddress
    src: IPAddress
    proto: Proto | int
    reqid: int
    mode: Mode | int | None  # None only when the kernel sent no template
    selector: Selector
    mark: tuple[int, int] | None = None
    if_id: int | None = None
    pcpu: int | None = None
    policy: AcquirePolicy | None = None
    templates: tuple[Template, ...] = ()
    aalgos: int = 0
    ealgos: int = 0
    calgos: int = 0
    security_context: bytes | None = None
    offload: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Expire:
    """XFRM_MSG_EXPIRE: soft (rekey soon) or hard (the state is gone)."""

    spi: int
    dst: IPAddress
    proto: Proto | int
    hard: bool
    state: KernelState


@dataclass(frozen=True, slots=True)
class EventsLost:
    """The kernel dropped events (socket buffer full).  ``states`` is the SAD
    as dumped right after, to resynchronise from."""

    states: tuple[KernelState, ...]


Event = Union[Acquire, Expire, EventsLost]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def decode_event(kind: int, payload: memoryview) -> Acquire | Expire | None:
    """One multicast message -> event (None for types we do not report)."""
    if kind == w.XFRM_MSG_ACQUIRE:
        return acquire_from_wire(w.decode_acquire(payload))
    if kind == w.XFRM_MSG_EXPIRE:
        sa, hard = w.decode_expire(payload)
        st = KernelState.from_wire(sa)
        return Expire(spi=sa.spi, dst=st.dst, proto=proto_or_int(sa.proto), hard=hard, state=st)
    return None


def acquire_from_wire(a: w.AcquireInfo) -> Acquire:
    fam = a.family or (w.AF_INET6 if a.daddr[4:] != b"\0" * 12 else w.AF_INET)
    policy = None
    if a.policy is not None:
        p = a.policy
        policy = AcquirePolicy(
            index=p.index,
            priority=p.priority,
            dir=p.dir,
            action=p.action,
            flags=p.flags,
            share=p.share,
            selector=Selector.from_wire(p.selector, a.selector.family or fam),
            lifetime=Lifetime.from_wire(p.lifetime),
            type=a.policy_type,
        )
    return Acquire(
        seq=a.seq,
        dst=unpack_address(fam, a.daddr),
        src=unpack_address(fam, a.saddr),
        proto=proto_or_int(a.proto),
        reqid=a.reqid,
        mode=None if a.mode is None else mode_or_int(a.mode),
        selector=Selector.from_wire(a.selector, fam),
        mark=a.mark,
        if_id=a.if_id,
        pcpu=a.pcpu,
        policy=policy,
        templates=tuple(
            Template(
                dst=unpack_address(t.family or fam, t.daddr),
                src=unpack_address(t.family or fam, t.saddr),
                spi=t.spi,
                proto=proto_or_int(t.proto),
                reqid=t.reqid,
                mode=mode_or_int(t.mode),
                share=t.share,
                optional=bool(t.optional),
                aalgos=t.aalgos,
                ealgos=t.ealgos,
                calgos=t.calgos,
            )
            for t in a.templates
        ),
        aalgos=a.aalgos,
        ealgos=a.ealgos,
        calgos=a.calgos,
        security_context=a.sec_ctx,
        offload=a.offload,
    )


class Monitor:
    """Subscribe to ACQUIRE and EXPIRE events of a network namespace
    (``ip xfrm monitor acquire expire``): a ``NETLINK_XFRM`` socket bound to
    the XFRMNLGRP_ACQUIRE and XFRMNLGRP_EXPIRE groups.  Opening raises
    ``NamespaceError``, ``InsufficientPrivilege`` or ``ResourceError`` as
    ``Allocator`` does; reading raises ``ClosedError`` once closed.

    >>> with Monitor() as mon:
    ...     for event in mon:          # blocks; or `async for event in mon`
    ...         print(event)

    Closing, garbage collection and fork() as ``Allocator``.
    """

    def __init__(
        self,
        netns: NetnsSpec = None,
        *,
        acquire: bool = True,
        expire: bool = True,
        rcvbuf: int = 1 << 20,
    ) -> None:
        check_int("rcvbuf", rcvbuf, 1, 1 << 30, "a byte count from 1 to 1 GiB")
        groups = (1 << (w.XFRMNLGRP_ACQUIRE - 1) if acquire else 0) | (1 << (w.XFRMNLGRP_EXPIRE - 1) if expire else 0)
        self.ns = Namespace.open(netns)
        try:
            self._events = XfrmSocket(self.ns, groups=groups, rcvbuf=rcvbuf)
            try:
                self._requests = XfrmSocket(self.ns, rcvbuf=None)
            except BaseException:
                self._events.close()
                raise
        except BaseException:
            self.ns.close()
            raise
        self._queue: deque[Event] = deque()
        self._closed = False
        self._forked_from: int | None = None  # see _after_fork
        self.lost = 0  # how many times events were dropped
        # aget(): one waiter on the fd at a time (add_reader replaces readers),
        # and close() must be able to wake it.
        self._alock: asyncio.Lock | None = None
        self._alock_loop: asyncio.AbstractEventLoop | None = None
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int] | None = None
        _lifecycle.track(self)

    def _after_fork(self, parent: int) -> None:
        """In a fork child (``_lifecycle``): inert.  Its sockets are the
        parent's too (an event read here is one the parent never sees), and
        an aget() waiter's loop is the parent's: close copies, wake nobody."""
        if self._closed:
            return
        self._closed = True
        self._forked_from = parent
        close_copy(self._events.sock)
        close_copy(self._requests.sock)
        self.ns.close_copy()

    def _open(self) -> bool:
        """Whether the monitor is open; ForkedError in a fork child."""
        if self._forked_from is not None:
            raise ForkedError("Monitor", self._forked_from)
        return not self._closed

    def fileno(self) -> int:
        """The event socket's fd, for select/poll loops of your own."""
        self._open()
        return self._events.fileno()

    def close(self) -> None:
        """Close the sockets; an ``aget()`` waiting on them raises ClosedError."""
        if not self._closed:
            self._closed = True
            waiter = self._waiter
            if waiter is not None:  # wake an aget() waiting on the fd
                loop, ready, fd = waiter
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_wake, ready)
            self._events.close()
            self._requests.close()
            self.ns.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):  # True: __init__ failed, nothing to close
            return
        try:
            warnings.warn(f"unclosed Monitor in {self.ns.description}", ResourceWarning, stacklevel=1, source=self)
        finally:
            self.close()

    def _dump(self) -> tuple[KernelState, ...]:
        return tuple(KernelState.from_wire(sa) for sa in self._requests.dump_sas())

    def _pump(self) -> None:
        """Move whatever is queued on the socket into the event queue."""
        if not self._open():
            raise ClosedError(errno.EBADF, "monitor is closed")
        while True:
            before = self._events.overruns
            data = self._events.recv_nowait()
            if self._events.overruns != before:
                self.lost += 1
                self._queue.append(EventsLost(self._dump()))
            if data is None:
                return
            try:
                for kind, _, _, _, payload in w.iter_messages(data):
                    ev = decode_event(kind, payload)
                    if ev is not None:
                        self._queue.append(ev)
            except DecodeError:
                continue  # a message we cannot read is skipped, never fatal

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: forever)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            if self._queue:
                return self._queue.popleft()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return None
            try:
                wait_readable(self._events.fileno(), remaining)
            except ValueError:
                raise ClosedError(errno.EBADF, "monitor is closed") from None

    def __iter__(self) -> Iterator[Event]:
        while self._open():
            ev = self.get()
            if ev is not None:
                yield ev

    async def aget(self) -> Event:
        """The next event, awaiting the socket on the running loop."""
        loop = asyncio.get_running_loop()
        if self._alock is None or self._alock_loop is not loop:
            self._alock, self._alock_loop = asyncio.Lock(), loop
        async with self._alock:  # one waiter on the fd at a time
            return await self._aget(loop)

    async def _aget(self, loop: asyncio.AbstractEventLoop) -> Event:
        while True:
            self._pump()
            if self._queue:
                return self._queue.popleft()
            ready: asyncio.Future[None] = loop.create_future()
            fd = self._events.fileno()
            loop.add_reader(fd, _wake, ready)
            self._waiter = (loop, ready, fd)
            try:
                await ready
            finally:
                self._waiter = None
                loop.remove_reader(fd)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while self._open():
            try:
                ev = await self.aget()
            except ClosedError:
                return
            yield ev

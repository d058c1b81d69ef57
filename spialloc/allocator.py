"""Allocator: the public, blocking face that a keying daemon holds.

One Allocator owns one request socket in one network namespace, a Guard (its
own or shared), and, while the guard is on, a watcher thread that listens for
the kernel's EXPIRE events so a reservation whose larval state died is known
as lost before its SPI can be handed to anyone else.  The rules it follows
are ``_rules``; the kernel I/O is ``_kernel``; both faces share a ``_core.Core``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, overload

from . import _binding as binding
from . import _rules as rules
from . import _wire as w
from ._core import BatchResult, Core, check_callback
from ._model import (
    Address,
    KernelState,
    MarkSpec,
    Proto,
    Request,
    Reservation,
    Reservations,
    check_int,
    pack_address,
    parse_address,
    parse_mark,
    parse_proto,
)
from ._netlink import DEFAULT_RCVBUF
from ._netns import Namespace, NetnsSpec
from ._rules import AllocatorStats
from ._shared import GuardSpec
from .errors import SpiallocError, SpiExhausted
from .guard import Guard
from .ha import Partition
from .monitor import Acquire

__all__ = ["Allocator", "AllocatorStats", "BatchResult"]


class Allocator:
    """Allocate and release SPIs in one network namespace.

    ``netns``: None (the caller's namespace), a name from ``ip netns``, a path
    (``/proc/PID/ns/net``), an open fd, or a ``Namespace``.
    ``guard``: True (the default: this process's guard for the namespace,
    shared by every Allocator and AsyncAllocator open on it with the same
    ``scope``, so no two of them can hand out one SPI), ``"private"`` (a
    guard of this allocator's own), False (no tracking: the kernel's answers
    as they are, duplicates included), or a Guard (bound to the first
    namespace it is used in).  Nothing is shared across processes: see the
    README's "Guard" section for running several.

    ``scope``: "spi" (an SPI is unique per protocol across destinations,
    the 6.17+ kernel rule) or "dst" (per destination, the older rule).
    ``backend``: the batch engine, "c", "python" or "auto" (default: the
    ``SPIALLOC_BACKEND`` environment variable, else "auto").  ``spi_range``,
    ``cpi_range``: this allocator's default ranges for ESP/AH and IPComp;
    ``partition``: this process's share of every range (HA clusters);
    ``allow_reserved``: permit SPIs 1-255.  ``sync``: seed the guard from a
    SAD dump at once (``sync()``).  ``on_lost``: called (from the watcher
    thread) with each reservation whose state died before commit.
    ``watch_expiry``: run the watcher thread that follows EXPIRE and SA
    events (off: call ``poll_events``).  ``max_retries``: collisions one
    allocation retries before ``DuplicateSpi``.  ``rcvbuf``: the request
    socket's receive buffer (``SO_RCVBUFFORCE``), which bounds batches.

    Opening makes a ``NETLINK_XFRM`` socket in the namespace (and the
    watcher's).  Raises ``InvalidRequest`` for a bad option,
    ``NamespaceError`` for a namespace that cannot be opened,
    ``InsufficientPrivilege`` without CAP_NET_ADMIN there, and
    ``ResourceError`` when out of file descriptors.

    Close it (or use ``with``); one dropped unclosed is closed when collected,
    with a ResourceWarning.  It does not survive fork(): in the child every
    call raises ForkedError and close() touches nothing of the parent's.
    """

    def __init__(
        self,
        netns: NetnsSpec = None,
        *,
        guard: GuardSpec = True,
        scope: Literal["spi", "dst"] = "spi",
        backend: str | None = None,
        spi_range: tuple[int, int] | None = None,
        cpi_range: tuple[int, int] | None = None,
        partition: Partition | None = None,
        allow_reserved: bool = False,
        sync: bool = False,
        on_lost: Callable[[Reservation], None] | None = None,
        watch_expiry: bool = True,
        max_retries: int = 8,
        rcvbuf: int = DEFAULT_RCVBUF,
    ) -> None:
        #: The internals this face shares with ``AsyncAllocator``; not a stable API.
        self.core = Core(
            netns,
            guard=guard,
            scope=scope,
            backend=backend,
            spi_range=spi_range,
            cpi_range=cpi_range,
            partition=partition,
            allow_reserved=allow_reserved,
            on_lost=on_lost,
            watch_expiry=watch_expiry,
            max_retries=max_retries,
            rcvbuf=rcvbuf,
        )
        try:
            if sync:
                self.sync()
        except BaseException:
            self.close()
            raise

    # --- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the sockets.  A batch running in another thread stops at its
        next round and releases what it had (it raises ClosedError); close
        waits for that, so the release can still reach the kernel."""
        self.core.close()

    def __enter__(self) -> Allocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "core", None)  # None: __init__ failed before making it
        if core is None or core.closed:
            return
        try:
            warnings.warn(f"unclosed Allocator in {core.ns.description}", ResourceWarning, stacklevel=1, source=self)
        finally:
            with contextlib.suppress(Exception):
                core.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (every other call then raises ClosedError)."""
        return self.core.closed

    @property
    def stats(self) -> AllocatorStats:
        """A copy of this allocator's counters (no syscall)."""
        return replace(self.core.book.stats)

    @property
    def guard(self) -> Guard | None:
        """The guard this allocator uses; None with ``guard=False``."""
        return self.core.book.guard

    @property
    def backend(self) -> str:
        """The batch engine in use: "c" or "python"."""
        return self.core.backend

    @property
    def ns(self) -> Namespace:
        """The network namespace this allocator works in."""
        return self.core.ns

    @property
    def partition(self) -> Partition | None:
        """This process's share of the ranges, if one was given."""
        return self.core.partition

    @property
    def on_lost(self) -> Callable[[Reservation], None] | None:
        """Called with a reservation whose larval state expired (from the
        watcher thread); settable."""
        return self.core.book.on_lost

    @on_lost.setter
    def on_lost(self, callback: Callable[[Reservation], None] | None) -> None:
        check_callback(callback)
        self.core.book.on_lost = callback

    @property
    def max_retries(self) -> int:
        """Collisions one allocation retries before DuplicateSpi; settable."""
        return self.core.book.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self.core.book.max_retries = check_int("max_retries", value, 0, 1 << 31)

    # --- allocation ------------------------------------------------------------

    def allocate(
        self,
        dst: Address,
        proto: str | int | Proto = "esp",
        *,
        src: Address | None = None,
        spi_range: tuple[int, int] | None = None,
        mode: str | int = "transport",
        reqid: int = 0,
        mark: MarkSpec = None,
        if_id: int | None = None,
        direction: str | int | None = None,
        seq: int = 0,
        pcpu: int | None = None,
        hold: float | None = None,
    ) -> Reservation:
        """Allocate one SPI (ALLOCSPI, ``ip xfrm state allocspi``): a larval state in the kernel.

        ``seq`` binds the request to a kernel ACQUIRE (its ``seq``), so the
        ACQ state gets the SPI.  With the guard on, an SPI that is still
        outstanding is never returned: the request is changed (``seq`` dropped,
        then a known-free SPI asked for exactly) and retried.

        ``hold`` (seconds): your negotiation may outlast the larval lifetime
        (``acq_expires``); until ``hold`` runs out, commit or release, an
        expired larval state is allocated again at once with the same SPI, so
        the reservation is not lost (unless someone takes the SPI in between).

        Raises ``InvalidRequest`` for bad input (before any syscall),
        ``SpiExhausted`` when no SPI of the range is free, ``DuplicateSpi``
        when the kernel kept returning outstanding SPIs, ``AlreadyBound`` for
        a ``seq`` that ``allocate_for`` bound, ``UnsupportedByKernel`` for an
        attribute the running kernel drops (``direction``, ``pcpu``),
        ``NetlinkError`` for any other refusal (errno and the kernel's text),
        ``ClosedError`` after ``close()``.
        """
        core = self.core
        if core.closed:
            core.check_open()
        until = None if hold is None else core.hold_until(hold)
        req = core.request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, seq, pcpu)
        if not req.seq:
            return self._allocate(req, until)
        binding.check(req.seq)
        r = self._allocate(req, until)
        binding.bound(req.seq, r, False)
        return r

    if not TYPE_CHECKING:
        _allocate_options = allocate

        @functools.wraps(_allocate_options)
        def allocate(self, dst, proto="esp", **options):
            # The per-SPI call, allocate(dst[, proto]), by hand: a call of
            # the signature above fills its ten keyword-only defaults in
            # (CPython looks each one up in a dict) and then has to tell
            # them apart from the caller's; with no options there is
            # nothing to tell, and the request is found by (dst, proto).
            # The signature above is what type checkers, help() and the
            # docs show, and what every other call goes through.
            if not options and type(proto) is str:
                core = self.core
                plain = core.plain.get((dst, proto))
                if plain is not None and not core.closed:
                    fast = core.fast
                    if fast is None:
                        return self._allocate(plain[0], None, plain[1])
                    # Guard off: _allocate's path without its layers (each
                    # layer of calls cost ~0.09 us here, 4% of the kernel's
                    # own ALLOCSPI): one C call on a socket of its own, no
                    # Python lock; anything but an SPI goes on in
                    # _allocate.  An interrupt that lands before the
                    # caller has the Reservation deletes the state (the C
                    # side keeps each thread's last SPI for that).
                    call, one, seqs = fast
                    req, prepared = plain
                    seq = next(seqs) & 0xFFFFFFFF
                    try:
                        spi = call(one, prepared, seq)
                        if spi >= 0:
                            return core.book.won(req, spi, 0)
                        return self._allocate(req, None, prepared, (seq, spi))
                    except BaseException:
                        core.take_back(req, [None, 0, None, seq])
                        raise
            # Named keywords, not **options: a call through ** is made from
            # C, and Python raises a pending interrupt (Ctrl-C) as such a
            # call returns, after the Reservation has left _allocate, where
            # nothing could delete its state any more.  A plain call of a
            # Python function returns without that check.
            if not options:
                return self._allocate_options(dst, proto)
            if options.keys() <= self._OPTION_DEFAULTS.keys():
                o = self._OPTION_DEFAULTS | options
                return self._allocate_options(
                    dst,
                    proto,
                    src=o["src"],
                    spi_range=o["spi_range"],
                    mode=o["mode"],
                    reqid=o["reqid"],
                    mark=o["mark"],
                    if_id=o["if_id"],
                    direction=o["direction"],
                    seq=o["seq"],
                    pcpu=o["pcpu"],
                    hold=o["hold"],
                )
            return self._allocate_options(dst, proto, **options)  # the TypeError for an unknown keyword

        _OPTION_DEFAULTS: dict[str, object] = dict(_allocate_options.__kwdefaults__)

    def allocate_for(
        self,
        acquire: Acquire,
        *,
        spi_range: tuple[int, int] | None = None,
        direction: str | int | None = None,
        hold: float | None = None,
    ) -> Reservation:
        """Give the ACQ state the kernel made for ``acquire`` its SPI.

        Everything binding needs comes from the event: dst, src, proto,
        mode, reqid, mark (the kernel finds the state by seq *and* mark),
        if_id, pcpu and seq, so a marked or if_id policy binds too.
        ``direction``: None keeps the ACQ state's own (out on Linux 6.10+,
        none before); "out" asks for it explicitly (UnsupportedByKernel
        before 6.10); "in" is refused: the ACQ state is the outbound SA.

        Each ACQUIRE binds once per process: a second ``allocate_for`` of
        the same seq (from any allocator, any thread), or an
        ``allocate(seq=)`` after it, raises ``AlreadyBound`` before any
        syscall.  If the binding fails (no SPI free in ``spi_range``, say),
        the seq may be bound again.  With the guard on, if the kernel hands
        the ACQ state an SPI that is still outstanding (old-rules kernels,
        scope "spi"), the guard cannot take it back: you get a fresh larval
        state instead, with ``seq`` 0 in the reservation, and the kernel
        sends another ACQUIRE when the ACQ state expires.

        One ALLOCSPI (more on a collision).  Raises ``AlreadyBound``,
        ``InvalidRequest`` (not an Acquire, no template, ``direction="in"``),
        and what ``allocate`` raises.
        """
        core = self.core
        if core.closed:
            core.check_open()
        until = None if hold is None else core.hold_until(hold)
        req = core.request_for(acquire, spi_range, direction)
        with binding.Claim(req.seq) as claim:
            return claim.done(self._allocate(req, until))

    def _allocate(
        self, req: Request, until: float | None, prepared: Any = None, sent: tuple[int, int] | None = None
    ) -> Reservation:
        """``prepared``: a plain request's C form (``Core.plain``), for the
        lock-free call; ``sent``: ``(seq, rc)`` of that call, made by
        ``allocate`` already and not an SPI (see ``Kernel.alloc_one``).

        An exception that is not the kernel's answer (Ctrl-C, a timer's
        handler: Python raises them as a call returns, most often the one
        that sent the request) leaves nothing behind: ``box`` holds the SPI
        from the moment the reply is read and the guard's token from the
        moment it is reserved (the plans keep their own, see
        ``single_plan``), and ``take_back`` deletes the state and frees the
        tuple before the exception goes on.  From here to the caller no
        further call is made, so the exception cannot land after the
        Reservation left this frame (CPython 3.11+: a Python function's
        return is not a place it checks for signals).  Not with a seq: the
        state is the kernel's ACQ state, left to expire."""
        core = self.core
        book = core.book
        guard = book.guard
        box: list[Any] = [None, 0, None, 0]  # shared with a plan (see _rules._Single.box)
        try:
            if guard is not None and (req.seq or rules.is_directed(book, req)):
                r = core.drive(rules.single_plan(book, req, box=box))
            else:
                # The common case: one round trip, and with the guard the plan's
                # generator only when the SPI collides (single_plan's first step, inline).
                try:
                    spi = core.kernel.alloc_one(req, req.spi_min, req.spi_max, box, prepared, sent)
                except SpiExhausted:
                    core.kernel.claim_stray(req)
                    raise
                if guard is None:
                    return book.won(req, spi, 0)
                token = guard.reserve_trusted(req.gdst, req.proto, spi, book.owner, box)
                if token:
                    r = book.won(req, spi, token)
                else:
                    book.stats.collisions += 1
                    # The plan takes the SPI over in the same box: no moment
                    # when neither would delete its state.
                    r = core.drive(rules.single_plan(book, req, first=spi, box=box))
            if book.on_lost is None and until is None:
                return r
            box[0], box[1] = r._spi, r._tok  # slots, not properties: no call, so no interrupt first
            return book.note(req, r, until)
        except BaseException as exc:
            if not isinstance(exc, SpiallocError) and not req.seq:
                core.take_back(req, box)
            raise

    @overload
    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = ...,
        *,
        strict: Literal[True] = ...,
        src: Address | None = ...,
        spi_range: tuple[int, int] | None = ...,
        mode: str | int = ...,
        reqid: int = ...,
        mark: MarkSpec = ...,
        if_id: int | None = ...,
        direction: str | int | None = ...,
        pcpu: int | None = ...,
        **unknown: object,
    ) -> Reservations: ...

    @overload
    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = ...,
        *,
        strict: Literal[False],
        src: Address | None = ...,
        spi_range: tuple[int, int] | None = ...,
        mode: str | int = ...,
        reqid: int = ...,
        mark: MarkSpec = ...,
        if_id: int | None = ...,
        direction: str | int | None = ...,
        pcpu: int | None = ...,
        **unknown: object,
    ) -> BatchResult: ...

    def allocate_many(
        self,
        count: int,
        dst: Address,
        proto: str | int | Proto = "esp",
        *,
        strict: bool = True,
        src: Address | None = None,
        spi_range: tuple[int, int] | None = None,
        mode: str | int = "transport",
        reqid: int = 0,
        mark: MarkSpec = None,
        if_id: int | None = None,
        direction: str | int | None = None,
        pcpu: int | None = None,
        **unknown: object,
    ) -> Reservations | BatchResult:
        """Allocate ``count`` SPIs with the same parameters in few syscalls.

        All or nothing by default: if any request fails, the SPIs that were
        allocated are released and BatchError says how many failed and why.
        With ``strict=False`` a BatchResult carries the successes and, per
        failed index, the error.

        The successes come as ``Reservations``: a sequence over the batch's
        arrays that builds a ``Reservation`` when an entry is read, so a
        batch costs no Python object per SPI until you look at one (its
        ``spis`` lists the SPIs without building any); ``release`` takes it
        whole, in bulk.

        ALLOCSPI ``count`` times, in as few ``sendmsg``/``recvmmsg`` calls as
        the receive buffer allows.  Raises ``BatchError`` (strict), and
        ``InvalidRequest``, ``UnsupportedByKernel``, ``ClosedError`` as
        ``allocate``; a Ctrl-C (or any exception) in the middle releases
        what the batch had allocated before it propagates.
        """
        core = self.core
        core.check_batch_args(count, unknown)
        core.check_open()
        req = core.request(dst, proto, src, spi_range, mode, reqid, mark, if_id, direction, 0, pcpu)
        if count == 0:
            empty = core.empty_batch(req)
            return empty if strict else BatchResult(empty)
        return core.run_batch(req, count, strict)

    # --- release and commit ------------------------------------------------------

    def release(self, reservations: Reservation | Iterable[Reservation]) -> int:
        """Delete the larval state(s) (DELSA) and free their tuples in the guard.

        A state already gone (expired, deleted by someone else, never
        installed) is not an error; a reservation the guard knows as lost is
        not deleted at all (its SPI may belong to someone else by now).
        Returns how many states were deleted.

        DELSA per reservation, batched (``ip xfrm state delete``).  Raises
        ``ReservationLost`` for a handle that is not current (lost,
        released, or handed out again; nothing is deleted then),
        ``InvalidRequest`` for one this allocator did not issue,
        ``ClosedError`` after ``close()``.
        """
        self.core.check_open()
        return self.core.release(reservations)

    def commit(self, reservation: Reservation) -> None:
        """Mark the reservation as installed (the caller ran UPDSA on it): the
        guard keeps its tuple outstanding until ``release``.  No syscall.
        Raises ReservationLost if its larval state expired first (or the
        handle is otherwise not current), InvalidRequest for a handle this
        allocator did not issue."""
        self.core.check_open()
        self.core.commit(reservation)

    def poll_events(self) -> int:
        """Process queued EXPIRE and SA events now (the watcher thread does it
        too); returns how many were handled.  Reads the event socket only."""
        self.core.check_open()
        return self.core.poll()

    # --- reading the SAD --------------------------------------------------------

    def lookup(
        self, dst: Address, spi: int, proto: str | int | Proto = "esp", *, mark: MarkSpec = None
    ) -> KernelState | None:
        """Read one state (GETSA, ``ip xfrm state get``); None if there is none.
        A marked state is found only with its ``mark``.  Raises
        ``InvalidRequest`` for bad input, ``NetlinkError`` if refused."""
        self.core.check_open()
        d = parse_address("dst", dst)
        p = parse_proto(proto)
        check_int("spi", spi, 0, 0xFFFFFFFF)
        family = w.AF_INET if d.version == 4 else w.AF_INET6
        return self.core.kernel.lookup(pack_address(d), spi, family, p, parse_mark(mark))

    def states(self, *, larval: bool | None = None, proto: str | int | Proto | None = None) -> list[KernelState]:
        """Every state in the namespace (GETSA dump, ``ip xfrm state list``),
        of all processes; ``larval=True`` keeps only larval ones (False:
        installed ones), ``proto`` one protocol.  Raises ``NetlinkError`` if
        the dump is refused."""
        self.core.check_open()
        p = None if proto is None else parse_proto(proto)
        out = self.core.kernel.dump_states()
        return [s for s in out if (larval is None or s.larval == larval) and (p is None or s.proto == p)]

    def sync(self) -> int:
        """Seed the guard from the SAD: every state that is not ours is marked
        foreign, so it is never handed out, and reservations whose state is
        gone are marked lost.  Returns the number of foreign tuples.  One
        GETSA dump; without a guard, nothing (0)."""
        return self.core.sync()

    def purge(self, *, reqid: int | None = None, mark: MarkSpec = None, if_id: int | None = None) -> int:
        """Delete the larval states a previous run of this daemon left behind
        (killed or crashed before releasing them: they would otherwise live
        until ``acq_expires``), and return how many.

        A state goes if it is larval with an SPI, is not bound to an ACQUIRE,
        matches every selector given, and is not reserved or committed here.
        At least one selector is required: give what only this daemon puts in
        its requests (its reqid range is the usual one).  Call it at start,
        before handing out SPIs, or at any time: this allocator's own
        reservations are never touched.  A GETSA dump, then DELSA per state;
        raises ``InvalidRequest`` without a selector."""
        return self.core.purge(reqid, mark, if_id)

    # --- namespace settings -----------------------------------------------------

    @property
    def acq_expires(self) -> int:
        """``net.core.xfrm_acq_expires`` of the namespace: larval lifetime,
        seconds (read and written in /proc/sys/net/core from inside the
        namespace; setting it needs real root: a namespace owned by a user
        namespace hides XFRM sysctls)."""
        self.core.check_open()
        return self.core.kernel.acq_expires()

    @acq_expires.setter
    def acq_expires(self, seconds: int) -> None:
        check_int("acq_expires", seconds, 1, 1 << 31, "a positive integer (seconds)")
        self.core.check_open()
        self.core.kernel.set_acq_expires(seconds)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        guard = "off" if self.guard is None else "on"
        return f"<Allocator {self.ns.description} backend={self.backend} guard={guard} {state}>"

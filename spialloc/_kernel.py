"""Every request an allocator sends to the kernel, for both of its faces.

One ``Kernel`` owns the request socket of one allocator and the batch engine
(C or Python): one ALLOCSPI, an engine round, DELSA one at a time or
batched, recovery of the states behind dropped replies, GETSA, SAD dumps
and the namespace's larval lifetime.  It decides nothing about which SPI to
hand out (that is ``_rules``); it only turns requests into kernel answers,
counting overruns, and never leaves a state it made unaccounted for.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import time
from types import ModuleType
from typing import Any, NamedTuple, Sequence

from . import _log
from . import _wire as w
from ._lifecycle import close_copy
from ._model import KernelState, Proto, Request, build_request
from ._netlink import REPLY_TRUESIZE, XfrmSocket
from ._netns import Namespace, read_sysctl, write_sysctl
from ._rules import LOST, PENDING, Book, DelKey, RecoverOp, RoundResult, made_by, orphans
from .errors import (
    RESTART_ERRNOS,
    ClosedError,
    NamespaceError,
    NetlinkError,
    SpiallocError,
    SpiExhausted,
    UnsupportedByKernel,
    from_errno,
    note_stray,
    out_of_fds,
)

ACQ_SYSCTL = "net.core.xfrm_acq_expires"
#: Request attributes a kernel may ignore without an error (its attribute
#: parser skips what it does not know): name, Request field, Linux version
#: that added it, and what the caller can do instead.
FEATURES = (
    ("XFRMA_SA_DIR", "direction", "6.10", "allocate without direction="),
    ("XFRMA_SA_PCPU", "pcpu", "6.13", "allocate without pcpu="),
)
#: The kernel's default larval lifetime, used when the sysctl cannot be read.
DEFAULT_ACQ_EXPIRES = 30.0


class Kernel:
    """The request socket of one allocator in one namespace."""

    def __init__(self, ns: Namespace, engine: ModuleType, book: Book, rcvbuf: int) -> None:
        self.ns = ns
        self.engine = engine
        self.book = book
        self.sock = XfrmSocket(ns, rcvbuf=rcvbuf)
        if book.guard is not None:
            book.guard.adopt_port(self.sock.portid)
        # The C engine's single-call ALLOCSPI, when the engine has one.
        native = getattr(engine, "native_single", None)
        self._one = None if native is None else native(self.sock._buf, self.sock.portid)
        self._one_max: int = getattr(engine, "ONE_MAX", 0)
        #: The C engine's lock-free single call (``_cbatch.Fast``) and the
        #: socket it has to itself (nothing else is sent on it: ALLOCSPI
        #: only, so no event of ours ever names its port).
        self.fast: Any = None
        self.fast_sock: XfrmSocket | None = None
        make_fast = getattr(engine, "Fast", None)
        if make_fast is not None:
            try:
                self.fast_sock = XfrmSocket(ns, rcvbuf=rcvbuf)
                self.fast = make_fast(self.fast_sock.fileno(), self.fast_sock._buf, self.fast_sock.portid)
            except BaseException:  # out of fds, say: nothing of ours stays open
                if self.fast_sock is not None:
                    self.fast_sock.close()
                self.sock.close()
                raise
        self._lifetime: float | None = None
        self._probes: dict[bytes, Probe] = {}  # by Request.attrs
        #: Set by close(): a running engine round stops after its chunk.
        self.closing = False

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()  # waits for a call in flight: never between a request and its reply
            self.fast_sock.close()  # type: ignore[union-attr]
        with self.sock.lock:  # the same for the locked socket
            self.sock.close()

    def after_fork(self) -> None:
        """In a fork child: drop the copies of the parent's sockets, taking
        no lock (a thread of the parent may have held one)."""
        close_copy(self.sock.sock)
        if self.fast is not None:
            self.fast.forget_fd()
            close_copy(self.fast_sock.sock)  # type: ignore[union-attr]

    # --- ALLOCSPI on the single allocate's own socket ------------------------------------

    def prepare(self, req: Request) -> Any:
        """``req`` made ready for ``fast.call`` (None without the C engine,
        or if its message is too long for it)."""
        return None if self.fast is None else self.fast.prepare(req.template, req.spi_min, req.spi_max)

    def fast_rest(self, seq: int, rc: int, box: list[Any]) -> int | None:
        """What ``fast.call(.., seq)`` returning ``rc`` (< 0) left to Python:
        None if nothing was sent (another thread had the socket: go the
        locked way), else the SPI, also put in ``box[0]``, or the typed
        refusal (``NetlinkError``, ``ClosedError``)."""
        fast, sock = self.fast, self.fast_sock
        assert sock is not None
        if rc == fast.BUSY:
            return None
        if rc == fast.FAILED:
            sock._send_failed(fast.errno())
        try:
            got = fast.got()
            if got == -errno.ENOBUFS:
                sock.overruns += 1  # as recv_nowait counts it
            return sock._alloc_rest(seq, sock._view[:got] if got >= 0 else None, box)
        except BaseException as exc:
            if not isinstance(exc, SpiallocError):
                sock._salvage(seq, box)
            raise
        finally:
            fast.release()

    def fast_salvage(self, box: list[Any]) -> None:
        """For ``Core.take_back``: an exception that is not the kernel's
        answer left the caller of ``fast.call(.., box[3])`` before it stored
        the SPI.  Put in ``box[0]`` the SPI this thread's call returned, or
        what the reply this thread still holds says (nothing if the call
        never ran, or was another thread's)."""
        fast, sock = self.fast, self.fast_sock
        if fast.held():
            try:
                sock._salvage(box[3], box)  # type: ignore[union-attr]
            finally:
                fast.release()
        else:
            box[0] = fast.last(box[3])

    # --- ALLOCSPI ---------------------------------------------------------------------

    def alloc_one(
        self,
        req: Request,
        spi_min: int,
        spi_max: int,
        box: list[Any] | None = None,
        prepared: Any = None,
        sent: tuple[int, int] | None = None,
    ) -> int:
        """One ALLOCSPI round trip; returns the SPI (host order).
        ``prepared``: ``req`` as ``prepare`` made it, to try the fast call
        (``req``'s own range only).  ``sent``: ``(seq, rc)`` of that call
        made by the caller already (``allocate``'s own, which returned ``rc``
        < 0): what it left is read here.  ``box``: ``[None, 0, None, 0]``
        (see ``errors.STRAY``); ``box[0]`` is the SPI as soon as the reply is
        read, so a caller that an exception leaves (Ctrl-C) before it has the
        SPI can still delete the state (``Core.take_back``)."""
        if box is None:
            box = [None, 0, None, 0]
        failed: NetlinkError | None = None
        if prepared is not None:
            fast = self.fast
            if sent is None:
                seq = box[3] = next(fast.seqs) & 0xFFFFFFFF
                got = fast.call(fast.one, prepared, seq)
            else:
                seq, got = sent
                box[3] = seq
            if got >= 0:
                box[0] = got
            else:
                try:
                    got = self.fast_rest(seq, got, box)
                except NetlinkError as exc:
                    failed, got = exc, None  # the refusal is handled below, as the locked socket's
            # box[0] has the SPI now (or nothing was made): a plan that takes
            # this box over must not find this call's SPI again by its seq.
            box[3] = 0
            if got is not None:
                return got  # type: ignore[no-any-return]
        one = self._one
        if failed is not None:
            note_stray(box, failed)
            self._refused(req, spi_min, spi_max, failed)
        elif one is not None and len(req.template) <= self._one_max:
            # The common case first, with no loop or message to set up.
            try:
                return self.sock.allocspi_native(one, req.template, spi_min, spi_max, box)
            except NetlinkError as exc:
                note_stray(box, exc)
                self._refused(req, spi_min, spi_max, exc)
        msg = bytearray(req.template)
        if one is None and (spi_min != req.spi_min or spi_max != req.spi_max):
            w.patch_range(msg, 0, spi_min, spi_max)
        for _ in range(63):
            try:
                if one is not None:
                    return self.sock.allocspi_native(one, req.template, spi_min, spi_max, box)
                return self.sock.allocspi(msg, box)
            except NetlinkError as exc:
                note_stray(box, exc)
                self._refused(req, spi_min, spi_max, exc)
        raise NetlinkError(errno.EINTR, "interrupted by signals 64 times in a row", "allocspi")

    def _refused(self, req: Request, spi_min: int, spi_max: int, exc: NetlinkError) -> None:
        """An ALLOCSPI failed: return to ask again (a signal came between
        random picks), else raise what the caller should see."""
        if exc.errno in RESTART_ERRNOS:
            if spi_min == spi_max:
                # The kernel checks for signals only after a pick that
                # hit a used SPI: with one value, that value is taken.
                raise SpiExhausted(errno.ENOENT, "the requested SPI is in use", "allocspi") from None
            return
        if exc.errno == errno.ENOBUFS and "reply dropped" in str(exc):
            self.book.stats.overruns += 1
            named = frozenset({spi_min}) if spi_min == spi_max else None
            self.recover_lost(RecoverOp(req, 1, time.time() - 1.0, frozenset(), named))
        raise exc

    def require(self, req: Request) -> None:
        """Raise UnsupportedByKernel if ``req`` carries an attribute this
        kernel would silently ignore (found out by ``_probe``, once)."""
        for name, field, since, instead in FEATURES:
            if getattr(req, field) is None:
                continue
            if not self._probe(req).kept[field]:
                raise UnsupportedByKernel(
                    errno.EOPNOTSUPP,
                    f"this kernel (Linux {os.uname().release}) ignores {name}: {field}= needs Linux {since} "
                    f"or later (or a distribution kernel that backported it); {instead}",
                    "allocspi",
                )

    def warm(self) -> None:
        """What the first batch would otherwise pay for, done at open: the
        larval lifetime (a sysctl read from inside the namespace, in a
        thread) and the engine's buffers for a full window.  No request is
        sent (the probe of a request's attributes stays with its first
        batch: opening leaves no trace in the SAD).  Best effort: whatever
        fails here is met again, and raised, when a call needs it."""
        self.lifetime()
        prepare = getattr(self.engine, "prepare", None)
        if prepare is not None:
            with contextlib.suppress(Exception):
                size = len(build_request("0.0.0.0").template)
                prepare(self.sock.sock, self.sock.window() * w.align4(size))

    def window(self, req: Request) -> int:
        """How many of ``req``'s ALLOCSPI replies fit in the receive buffer."""
        return self.sock.window(self._probe(req).reply)

    def _probe(self, req: Request) -> Probe:
        """What the kernel makes of ``req``'s attributes, found out once per
        set of attributes: one ALLOCSPI with them, deleted at once.  The
        probe asks for the unspecified address, so it can neither take over
        an ACQ state the kernel made for an ACQUIRE (those match on
        addresses) nor take an SPI the daemon could be handed."""
        probe = self._probes.get(req.attrs)
        if probe is not None:
            return probe
        msg = bytearray(req.unspecified().template)
        with self.sock.lock:
            seq = self.sock.next_seq()
            w.patch_seq(msg, 0, seq)
            kind, payload, reply = self.sock.transact_measured(bytes(msg), seq, "allocspi")
            if kind != w.XFRM_MSG_NEWSA or payload is None:
                raise NetlinkError(errno.EPROTO, f"unexpected reply type {kind} to ALLOCSPI", "allocspi")
            sa = w.decode_sa(payload)
            dmsg = bytearray(_delsa(sa.daddr, sa.spi, req.family, req.proto, req.mark, self.sock.portid))
            seq = self.sock.next_seq()
            w.patch_seq(dmsg, 0, seq)
            _, _, ack = self.sock.transact_measured(bytes(dmsg), seq, "delsa")
        probe = self._probes[req.attrs] = Probe(
            {field: kept_in_reply(sa, field) for _, field, _, _ in FEATURES}, reply, ack
        )
        return probe

    def claim_stray(self, req: Request) -> None:
        """A refused ALLOCSPI leaves its larval state behind with SPI 0 until it
        expires, and DELSA cannot name SPI 0.  A request with the same
        parameters reuses that state, so ask for any SPI, then delete it.
        Not when that state is an ACQ state the kernel made for an ACQUIRE
        (a request without seq reuses those too): it belongs to the SA the
        ACQUIRE asks for, and ALLOCSPI with its seq must still find it."""
        if req.seq:
            return  # refused on the kernel's own ACQ state: not ours to remove
        strays = [st for st in self.states_to(req) if st.spi == 0 and st.larval and made_by(st, req)]
        if not strays or any(st.acquire_seq for st in strays):
            return
        lo, hi = (0x100, 0xFFFF) if req.proto is Proto.COMP else (0x100, 0xFFFFFFFF)
        box: list[Any] = [None, 0, None, 0]
        try:
            spi = self.alloc_one(req, lo, hi, box=box)
            self.delete(req.daddr, spi, req.family, req.proto, req.mark)
        except SpiallocError:
            pass  # nothing free at all: it expires on its own
        except BaseException:
            # Interrupted (Ctrl-C) between the ALLOCSPI and its DELSA: the
            # state has an SPI now, and nobody else knows it.
            if box[0] is not None:
                with contextlib.suppress(SpiallocError):
                    self.delete(req.daddr, box[0], req.family, req.proto, req.mark)
            raise

    def round(
        self,
        req: Request,
        n: int,
        cands: Sequence[int] | None,
        since: float,
        chunk: int,
        box: list[tuple[Sequence[int], Sequence[int]] | None] | None = None,
    ) -> RoundResult:
        """One engine call for ``n`` requests (exact SPIs when ``cands``).  If
        it is interrupted, what the kernel allocated is deleted first."""
        ranges = None if cands is None else (array.array("I", cands), array.array("I", cands))
        sock = self.sock
        if box is None:
            box = [None]
        with sock.lock:
            seq0 = sock.next_seq(n)
            try:
                # ``chunk``: the window read at the batch's start, halved
                # after an overrun.  The engine puts its result in ``box``
                # as soon as it exists.
                got, errs, text, overruns = self.engine.alloc_batch(
                    sock.sock, sock.portid, req.template, n, seq0, ranges, chunk, self._stop_if_closing, box
                )
            except BaseException as exc:
                # Raised inside the engine: its partial result.  Raised as the
                # result came back up (a signal is delivered when a call
                # returns): the box has it.  Deleted here, so not by the caller.
                partial = getattr(exc, "spialloc_partial", None) or box[0]
                box[0] = None
                self._abandon_round(req, partial, since, cands)
                raise
        self.book.stats.batches += 1
        if overruns:
            self.book.stats.overruns += overruns
            sock.forget_size()  # the window was too big: someone shrank the buffer?
        clean = errs.count(0) == n
        if not isinstance(got, array.array):
            got = array.array("I", got)  # the Python engine's list
        return RoundResult(got, errs, text, bool(overruns) or (not clean and LOST in errs), clean)

    def _stop_if_closing(self) -> None:
        # Called by the engine after every chunk: what it sent is settled
        # and deleted (_abandon_round), and the batch raises ClosedError.
        if self.closing:
            raise ClosedError(errno.EBADF, "allocator closed during the batch")

    def _abandon_round(
        self,
        req: Request,
        partial: tuple[Sequence[int], Sequence[int]] | None,
        since: float,
        cands: Sequence[int] | None,
    ) -> None:
        if partial is None:
            return
        got, errs = partial
        ok = [s for s, e in zip(got, errs, strict=True) if e == 0]
        self.book.stats.released += self.delete_all([(req.daddr, s, req.family, int(req.proto), req.mark) for s in ok])
        lost = [i for i, e in enumerate(errs) if e == LOST]
        if lost:
            # An interrupt can also cut a reply off after it was read: LOST.
            self.recover_lost(
                RecoverOp(
                    req,
                    len(lost),
                    since,
                    frozenset(),
                    None if cands is None else frozenset(cands[i] for i in lost),
                    any(e not in (0, LOST, PENDING) for e in errs),
                )
            )

    def recover_lost(self, op: RecoverOp) -> int:
        """Replies were dropped (ENOBUFS): delete the larval states behind
        them, if they can be told from others' (``_rules.orphans``)."""
        spis = orphans(op, self.states_to(op.req), self.book.guard)
        req = op.req
        if spis is None:
            self.book.stats.unrecovered += op.lost
            _log.kernel.warning(
                "%d ALLOCSPI replies for %s dropped (ENOBUFS); their larval states cannot be told from others' "
                "and are left to expire (net.core.xfrm_acq_expires)",
                op.lost,
                req.dst,
            )
            return 0
        found = sum(self.delete(req.daddr, spi, req.family, req.proto, req.mark) for spi in spis)
        self.book.stats.recovered += found
        _log.kernel.warning(
            "%d ALLOCSPI replies for %s dropped (ENOBUFS); %d orphaned larval states found and deleted",
            op.lost,
            req.dst,
            found,
        )
        return found

    # --- DELSA ---------------------------------------------------------------------------

    def delete(self, daddr: bytes, spi: int, family: int, proto: int, mark: tuple[int, int] | None) -> bool:
        """One DELSA; False if the state was already gone."""
        msg = bytearray(_delsa(daddr, spi, family, proto, mark, self.sock.portid))
        with self.sock.lock:
            seq = self.sock.next_seq()
            w.patch_seq(msg, 0, seq)
            try:
                self.sock.transact(bytes(msg), seq, "delsa")
            except NetlinkError as exc:
                if exc.errno == errno.ESRCH:
                    return False
                raise
        return True

    def delete_all(self, keys: list[DelKey]) -> int:
        """DELSA for each key (batched through the engine when there are
        several); returns how many states were deleted."""
        if not keys:
            return 0
        if len(keys) == 1:
            return int(self.delete(*keys[0]))
        # Messages differ only in size when some carry a mark: batch by size.
        by_size: dict[int, list[bytes]] = {}
        daddr, _, family, proto, mark = keys[0]
        if all(k[0] == daddr and k[2] == family and k[3] == proto and k[4] == mark for k in keys):
            # One state's template, the SPI patched in: a batch's release.
            m = _delsa(daddr, 0, family, proto, mark, self.sock.portid)
            buf = bytearray(m * len(keys))
            size = len(m)
            pack = w.BE32.pack_into
            for i, k in enumerate(keys):
                pack(buf, i * size + DELSA_SPI_OFFSET, k[1])
            batches: list[tuple[int, bytes | bytearray, int]] = [(size, buf, len(keys))]
        else:
            for k in keys:
                m = _delsa(*k, self.sock.portid)
                by_size.setdefault(len(m), []).append(m)
            batches = [(size, b"".join(msgs), len(msgs)) for size, msgs in by_size.items()]
        deleted = 0
        sock = self.sock
        for size, data, count in batches:
            with sock.lock:
                seq0 = sock.next_seq(count)
                errs = self.engine.delsa_batch(
                    sock.sock,
                    sock.portid,
                    data,
                    size,
                    count,
                    seq0,
                    sock.window(max((p.ack for p in self._probes.values()), default=REPLY_TRUESIZE)),
                )
            for e in errs:
                if e == 0:
                    deleted += 1
                elif e == LOST:
                    # Only the ack was dropped: the kernel handles a request
                    # inside sendmsg, so the state is gone (counted as ours).
                    self.book.stats.overruns += 1
                    sock.forget_size()
                    deleted += 1
                elif e != errno.ESRCH:
                    raise from_errno(e, None, "delsa")
        return deleted

    # --- reading the SAD -------------------------------------------------------------------

    def lookup(
        self, daddr: bytes, spi: int, family: int, proto: int, mark: tuple[int, int] | None
    ) -> KernelState | None:
        """GETSA; None if there is no such state."""
        msg = bytearray(w.getsa(0, w.usersa_id(daddr, spi, family, proto), w.sa_attrs(mark, None, None, None)))
        with self.sock.lock:
            seq = self.sock.next_seq()
            w.patch_seq(msg, 0, seq)
            try:
                kind, payload = self.sock.transact(bytes(msg), seq, "getsa")
            except NetlinkError as exc:
                if exc.errno == errno.ESRCH:
                    return None
                raise
        if kind != w.XFRM_MSG_NEWSA or payload is None:
            return None
        return KernelState.from_wire(w.decode_sa(payload))

    def dump_states(self) -> list[KernelState]:
        return [KernelState.from_wire(sa) for sa in self.sock.dump_sas()]

    def states_to(self, req: Request) -> list[KernelState]:
        """The states with ``req``'s destination and protocol."""
        sas = self.sock.dump_sas((req.family, req.daddr, int(req.proto)))
        return [KernelState.from_wire(sa) for sa in sas]

    def present(self, req: Request) -> set[int]:
        """The SPIs in the SAD with ``req``'s proto and destination."""
        return {s.spi for s in self.states_to(req)}

    # --- the larval lifetime ---------------------------------------------------------------

    def acq_expires(self) -> int:
        """``net.core.xfrm_acq_expires`` of the namespace, read now."""
        try:
            return int(read_sysctl(self.ns, ACQ_SYSCTL))
        except (OSError, NamespaceError) as exc:
            raise _no_acq_sysctl(exc) from None

    def set_acq_expires(self, seconds: int) -> None:
        try:
            write_sysctl(self.ns, ACQ_SYSCTL, seconds)
        except (OSError, NamespaceError) as exc:
            raise _no_acq_sysctl(exc) from None
        self._lifetime = float(seconds)

    def lifetime(self) -> float:
        """The larval lifetime, read once (the setter above keeps it current)."""
        if self._lifetime is None:
            try:
                self._lifetime = float(self.acq_expires())
            except (OSError, ValueError, SpiallocError):
                self._lifetime = DEFAULT_ACQ_EXPIRES
        return self._lifetime


class Probe(NamedTuple):
    """What one kernel makes of a set of request attributes."""

    kept: dict[str, bool]  # Request field -> the kernel echoes (so parsed) it
    reply: int  # bytes of receive buffer an ALLOCSPI reply takes
    ack: int  # bytes of receive buffer a DELSA ack takes


def kept_in_reply(sa: w.SaInfo, field: str) -> bool:
    """Whether the kernel's reply carries the attribute the request set
    (a kernel that parsed it echoes it in every NEWSA)."""
    return getattr(sa, field) is not None


#: Where a DELSA message (header, struct xfrm_usersa_id) holds the SPI.
DELSA_SPI_OFFSET = w.NLMSGHDR_LEN + 16


def _delsa(daddr: bytes, spi: int, family: int, proto: int, mark: tuple[int, int] | None, portid: int) -> bytes:
    # The kernel multicasts our DELSA to XFRMNLGRP_SA with the header's
    # nlmsg_pid: with our port id there, every watcher on this guard can
    # tell its deletes (already booked) from anyone else's (ip sends 0).
    return w.delsa(0, w.usersa_id(daddr, spi, family, proto), w.sa_attrs(mark, None, None, None), portid=portid)


def _no_acq_sysctl(exc: OSError | NamespaceError) -> SpiallocError:
    code = exc.errno or errno.EIO
    full = out_of_fds(code, ACQ_SYSCTL)
    if full is not None:
        return full
    if code == errno.ENOENT:
        return NamespaceError(
            code,
            f"{ACQ_SYSCTL} is not available here: the kernel hides XFRM sysctls "
            "in network namespaces owned by a user namespace (run as root to change it)",
        )
    return NamespaceError(code, f"{ACQ_SYSCTL}: {exc.strerror or exc}")

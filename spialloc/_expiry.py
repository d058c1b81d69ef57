"""The expiry watcher: the kernel's EXPIRE and SA events applied to an allocator's guard.

A larval state lives ``net.core.xfrm_acq_expires`` seconds; when it dies its
SPI is free for the next ALLOCSPI, whoever asks.  The watcher listens on
``XFRMNLGRP_EXPIRE`` in a thread of its own, so a reservation whose state
died is known as lost before its SPI can be handed out again: the guard
frees the tuple, ``on_lost`` hears of it, and ``commit`` raises.  A held
reservation's state is made again instead.  It listens on ``XFRMNLGRP_SA``
too, for what others do to our states: a DELSA not sent by this process is
a death like an expiry (a reservation is lost, a committed SA released), a
FLUSHSA is checked against a dump, and an UPDSA that installs a real SA on
a reserved tuple commits it, whoever sent it.  If the kernel dropped events
(ENOBUFS), a SAD dump finds the reservations that died unseen.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import sys
import threading
import time
import weakref

from . import _log
from . import _rules as rules
from . import _wire as w
from ._kernel import Kernel
from ._lifecycle import close_copy
from ._model import guard_dst
from ._netlink import XfrmSocket
from ._netns import Namespace
from .errors import DecodeError, SpiallocError, out_of_fds

EXPIRE_GROUP = 1 << (w.XFRMNLGRP_EXPIRE - 1)
#: DELSA, UPDSA and FLUSHSA, whoever sent them: outside changes to our states.
SA_GROUP = 1 << (w.XFRMNLGRP_SA - 1)
#: Room for ~1,000 queued EXPIRE events before the kernel drops some.
EVENT_RCVBUF = 1 << 20


class ExpiryWatcher:
    """One EXPIRE socket and the thread that reads it.  ``poll`` may also be
    called from any thread (the allocator does, before deciding on a
    collision), so events are handled under the socket's lock."""

    def __init__(self, ns: Namespace, book: rules.Book, kernel: Kernel) -> None:
        self.book = book
        self.kernel = kernel
        self.sock = XfrmSocket(ns, groups=EXPIRE_GROUP | SA_GROUP, rcvbuf=EVENT_RCVBUF)
        self._filter_version = -1
        #: Held while a filter is made and attached, and while the socket
        #: closes: ``ports_changed`` runs in whichever thread made a socket.
        self._filter_lock = threading.Lock()
        self._closing = False
        opened: list[int] = []
        sel: selectors.BaseSelector | None = None
        try:
            if book.guard is not None:
                book.guard.follow_ports(self)  # first: no port adopted from here on goes unfiltered
            self._refilter()
            # Both made here, not in the thread: out of fds must fail the
            # constructor, not leave a watcher that died unseen.
            self._wake_r, self._wake_w = os.pipe()
            opened += (self._wake_r, self._wake_w)
            # selectors (epoll), not select(): nothing may depend on fd numbers below 1024.
            sel = selectors.DefaultSelector()
            sel.register(self.sock.fileno(), selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
        except BaseException as exc:
            for fd in opened:
                os.close(fd)
            if sel is not None:
                sel.close()
            self.sock.close()
            if isinstance(exc, OSError):  # pipe(2) and epoll_create(2) fail only for want of fds
                raise out_of_fds(exc.errno, "expiry watcher") or exc from None
            raise
        self._sel = sel
        self._thread = threading.Thread(
            target=_watch,
            args=(weakref.ref(self), sel, self._wake_r),
            name="spialloc-expiry",
            daemon=True,
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"x")
        # No self-join (close() from on_lost, or a dropped Allocator collected
        # in this thread), and none while the interpreter exits: a daemon
        # thread may never run again then.
        if threading.current_thread() is not self._thread and not sys.is_finalizing():
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with self._filter_lock:
            self.sock.close()

    def after_fork(self) -> None:
        """In a fork child (``_lifecycle``): the thread stayed in the parent,
        and the pipe and socket are shared with it.  Close this process's
        copies only: a byte on the pipe would stop the parent's watcher."""
        self._closing = True
        self._filter_lock = threading.Lock()  # perhaps held by a parent's thread at fork time
        close_copy(self.sock.sock)
        close_copy(self._wake_r)
        close_copy(self._wake_w)
        close_copy(self._sel.fileno())

    def step(self) -> bool:
        """Handle what woke the thread; False when the watcher is closing."""
        try:
            self.poll()
        except Exception:  # the watcher must outlive any one bad event
            if not self._closing:
                _log.watcher.exception("expiry watcher: handling an event failed; it goes on")
        return not self._closing

    def poll(self) -> int:
        """Handle the EXPIRE events queued now; returns how many."""
        handled = 0
        guard = self.book.guard
        with guard.deaths_lock if guard is not None else contextlib.nullcontext(), self.sock.lock:
            while True:
                data = self.sock.recv_nowait()
                if data is None:
                    break
                handled += self._handle(data)
            if self.sock.overruns:
                _log.kernel.warning(
                    "the kernel dropped %d batches of XFRM events (ENOBUFS) for %s; resyncing the guard from a dump",
                    self.sock.overruns,
                    self.sock.ns.description,
                )
                self.sock.overruns = 0
                self.resync()
        return handled

    def _handle(self, data: memoryview) -> int:
        """Apply one datagram of events; returns the deaths among them."""
        guard = self.book.guard
        if guard is None:
            return 0
        handled = 0
        flushed = False
        for kind, _, seq, pid, payload in w.iter_messages(data):
            try:
                if kind == w.XFRM_MSG_EXPIRE:
                    sa, hard = w.decode_expire(payload)
                    if not hard:
                        continue
                    cause = 0
                elif kind == w.XFRM_MSG_DELSA:
                    if guard.owns_port(pid):
                        self._refilter()  # an allocator joined since the filter was made
                        continue  # release, purge or recovery: booked when sent
                    family, daddr, spi, proto = w.delsa_tuple(payload)
                    if guard.state(guard_dst(family, daddr), proto, spi) is None:
                        continue  # none of ours: others' SA churn costs only this
                    sa = w.decode_delsa(payload)
                    cause = (pid << 32 | seq) + 1
                elif kind == w.XFRM_MSG_UPDSA:
                    sa = w.decode_sa(payload)
                    if not sa.larval:
                        rules.installed(self.book, _key(sa))
                    continue
                elif kind == w.XFRM_MSG_FLUSHSA:
                    flushed = True  # names no state: the dump below tells which
                    continue
                else:
                    continue
            except DecodeError:
                continue  # a message we cannot read is skipped, never fatal
            handled += 1
            key = _key(sa)
            before = guard.seen_death(*key, sa.add_time, cause)
            if before is not None:
                if before == guard.token(*key) or self._in_sad(key):
                    continue  # a copy of a death already acted on
                guard.seen_death(*key, sa.add_time, cause, again=True)
            self.died(key)
        if flushed:
            _log.guard.info(
                "a FLUSHSA emptied the SAD of %s: resyncing the guard from a dump", self.sock.ns.description
            )
            self.resync()
        return handled

    def _refilter(self) -> None:
        """Our own DELSAs (one event per state a release deletes) and NEWSAs
        are dropped by the kernel, before they wake this thread: on a 2-core
        machine the wake-ups alone doubled the cost of allocating."""
        guard = self.book.guard
        if guard is None:
            return
        with self._filter_lock:
            if self._closing:
                return
            version, ports = guard.ports()
            if version != self._filter_version:
                self._filter_version = version
                self.sock.attach_filter(w.filter_own_events(ports))

    def ports_changed(self) -> None:
        """An allocator joined the guard (``Guard.adopt_port``, in its thread).
        The filter only saves wake-ups (``_handle`` skips our own DELSAs
        anyway), so its failure must not fail the allocator that joined."""
        try:
            self._refilter()
        except OSError as exc:
            _log.watcher.warning("expiry watcher: could not refresh its socket filter: %s", exc)

    def _in_sad(self, key: rules.Key) -> bool:
        """Whether a state holds the tuple now (a rare question: a second
        report of a death with the same add time and cause)."""
        return key in rules.state_keys(self.kernel.dump_states())

    def died(self, key: rules.Key) -> None:
        """One state is gone: renew it if held, else free it and report a loss
        (to the allocator that issued the reservation)."""
        if self._renew(key):
            return
        rules.died(self.book, key)

    def _renew(self, key: rules.Key) -> bool:
        """A held reservation's larval state expired: allocate its SPI again.
        The guard keeps the tuple reserved meanwhile, so no thread of ours
        can take it; another process could, and then it is lost after all."""
        found = rules.renewable(self.book, key, time.monotonic())
        if found is None:
            return False
        owner, req = found
        try:
            self.kernel.alloc_one(req, key[2], key[2])
        except SpiallocError as exc:
            owner.held.pop(key, None)
            _log.guard.warning(
                "hold not renewed: %s was taken before it could be allocated again (%s)", _log.tuple_text(*key), exc
            )
            return False
        owner.stats.renewed += 1
        _log.guard.debug("hold renewed: %s allocated again after its larval state expired", _log.tuple_text(*key))
        return True

    def resync(self) -> None:
        """Events were dropped, or a FLUSHSA named no state: anything the
        guard holds as ours that is no longer in the SAD has died unseen."""
        if self.book.guard is None:
            return
        before = self.book.guard.mark()
        rules.missing_from(self.book, rules.state_keys(self.kernel.dump_states()), before)


def _key(sa: w.SaInfo) -> rules.Key:
    return (guard_dst(sa.family, sa.daddr), sa.proto, sa.spi)


def _watch(ref: weakref.ref[ExpiryWatcher], sel: selectors.BaseSelector, wake_fd: int) -> None:
    """The watcher thread.  It holds its watcher only while handling events:
    a running thread is a GC root, and through the watcher's on_lost (often
    a method of whoever holds the Allocator) it would keep a dropped
    Allocator alive for ever, never closed."""
    try:
        while True:
            ready = sel.select()
            if any(key.fd == wake_fd for key, _ in ready):
                return
            watcher = ref()
            if watcher is None or not watcher.step():
                return
            del watcher
    except (OSError, ValueError):
        return  # closed under us
    finally:
        sel.close()

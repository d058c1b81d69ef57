"""The duplicate guard: every (dst, proto, spi) a process has outstanding.

The kernel can hand out an SPI that is still in use: ALLOCSPI reusing an
ACQUIRE seq returns the same larval state again, an expired larval state frees
its SPI for the next caller while a daemon still holds it, and kernels before
6.17 keep SPIs unique only per destination.  The Guard remembers what is
outstanding so an allocator can refuse such duplicates; it is pure data and
knows nothing about netlink.  One Guard may be shared by several allocators in
several threads: every public method takes the one lock and is atomic.

Scopes.  ``"spi"`` (default) treats (proto, spi) as taken whatever the dst,
the 6.17+ kernel rule; ``"dst"`` keys on (dst, proto, spi), the older
per-destination rule.  Queries (``is_outstanding``,
``state``, ``owner_dst``, ``pick_free``, ``count_in``) answer under the scope.
Mutations that name one kernel state (``commit``, ``release``, ``expire``) need
the exact tuple: under scope "spi" a call naming another dst than the recorded
one is treated as untracked, so one destination can never free another's SPI.
``mark_foreign`` never overwrites one of our own entries (release it first).

dst is a 16-byte destination key; the allocator passes ``_model.guard_dst``
(IPv4 as IPv4-mapped IPv6, so no IPv6 address can alias an IPv4 one).  Other
lengths are refused: a 4-byte key would silently differ from the 16-byte key of
the same address.

Identity.  Every reservation gets a token, unique for its tuple in this
guard: a serial number (from a random start, so a handle from another guard
or process practically never matches) and the reserving owner's id
(``owner``, an allocator's; 0 for direct callers).  A batch reserved whole
(``reserve_batch``) takes one serial for all its tuples: every check is of
a (tuple, token) pair, and a tuple is in a batch once.  ``commit``, ``release`` and ``expire``
given a token act only if it is the token of the current entry: a stale
handle (its state expired and the SPI was reserved again, or it was
released) can neither commit nor free its successor.  ``owner_of`` tells
whose a token is, so a loss is reported to the allocator that issued it.
FOREIGN entries have no token.

Layout.  One dict maps an int key to an int code.  Key: ``proto << 32 |
spi`` (scope "spi") or ``dst_index << 40 | proto << 32 | spi`` (scope "dst"),
so ``key >> 32`` is also the ``count_in`` bucket.  Code: ``token << 24 |
dst_index << 2 | state`` (``_TOK``); FOREIGN codes (token 0) come from a per-dst table
of prebuilt ints so those entries share their value object.  dsts are
interned to reference-counted indices that are recycled when their last
tuple goes.  A reserved tuple therefore costs one dict entry, its key int
and its code int; the tuples of a batch reserved whole share one code int.
Measured with tracemalloc (Python 3.11; 1,000,000 random distinct SPIs of
0xC0000000-0xCFFFFFFF; traced bytes after minus before, divided by 1M; the
child of ``benchmarks/_harness.memory``), scope "spi", one dst: reserved one
by one, 142 bytes per tuple with the token int each Reservation keeps;
reserved in batches of 1,000 (``reserve_batch``, as ``allocate_many`` does),
78 bytes per tuple including the batch's 4-byte SPI array entry.  Before
tokens, also measured (one by one):

    scope "dst", 16 dsts                  74 bytes per tuple
    scope "spi", 1M dsts (one tuple each) 329 bytes per tuple
    scope "dst", 1M dsts (one tuple each) 399 bytes per tuple

(the code int adds the same 36 bytes to each).

With a dst per tuple the interned dst, its index and code table dominate (plus
49 bytes for the dst bytes object, unless the caller keeps it anyway); the
allocating side is the receiver, so dst is normally one of a few local
addresses.  The lost-tuple record adds 124 bytes per remembered tuple, about
8 MB when full at the default 65,536.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import random
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

from . import _lifecycle
from ._lifecycle import InertLock
from ._model import V4MAPPED, check_int
from .errors import InvalidRequest, ReservationLost

__all__ = ["Guard", "GuardStats", "State", "LOST_CAPACITY", "owner_of"]

#: How many expired tuples ``commit`` can still name as lost; a bound, so that
#: a daemon whose SAs expire for months does not grow without limit.
LOST_CAPACITY = 65536
#: Deaths remembered for ``seen_death``: far more than a watcher's socket
#: buffer queues (about 1,000 events) before it overruns and resyncs.
DEATHS_KEPT = 16384
#: Port ids of request sockets remembered by ``adopt_port``.
PORTS_KEPT = 4096
#: Random probes before ``pick_free`` falls back to a scan: even at 97%
#: density 32 probes find a free value 62% of the time (1 - 0.97**32).
PROBES = 32

_SPI_MAX = 0xFFFFFFFF
_R, _C, _F = 0, 1, 2
#: Low bits of a token: the owner that reserved it.
OWNER_BITS = 20
OWNER_MASK = (1 << OWNER_BITS) - 1
#: A code is ``token << _TOK | dst_index << 2 | state``: 22 bits of dst index
#: (4M destinations outstanding at once) keep a code below 91 bits, a 36-byte
#: int (with 30 bits it was 92 bits and 40 bytes: a million tuples, 4 MB).
_TOK = 24
_IDX_MASK = (1 << (_TOK - 2)) - 1


class PortFollower(Protocol):
    """What ``Guard.follow_ports`` calls (an expiry watcher, to refilter)."""

    def ports_changed(self) -> None: ...


class State(enum.Enum):
    RESERVED = "reserved"  #: larval: allocated, SA not installed yet
    COMMITTED = "committed"  #: the caller installed the SA
    FOREIGN = "foreign"  #: held by someone else (seen in the SAD or refused by the kernel)


_STATES = (State.RESERVED, State.COMMITTED, State.FOREIGN)


@dataclass(frozen=True, slots=True)
class GuardStats:
    """A snapshot of a guard: tuples held, by state.  ``collisions`` counts refused ``reserve`` calls and ``lost``
    the RESERVED tuples ``expire`` took away; both only grow."""

    outstanding: int
    reserved: int
    committed: int
    foreign: int
    collisions: int
    lost: int


def owner_of(token: int) -> int:
    """The owner id a token was issued to (0: a direct ``reserve`` caller)."""
    return token & OWNER_MASK


def _check(dst: object, proto: object, spi: object) -> tuple[bytes, int, int]:
    if not isinstance(dst, bytes) or len(dst) != 16:
        raise InvalidRequest(f"dst={dst!r} must be a 16-byte packed address")
    return dst, check_int("proto", proto, 0, 0xFF), check_int("spi", spi, 0, _SPI_MAX)


def _dst_text(dst: bytes) -> str:
    # Only for messages.  IPv4-mapped (the allocator's form) or zero-padded
    # IPv4 read better as IPv4.
    if dst[:12] == V4MAPPED:
        return str(ipaddress.IPv4Address(dst[12:]))
    if dst[4:] == bytes(12) and dst[:4] != bytes(4):
        return str(ipaddress.IPv4Address(dst[:4]))
    return str(ipaddress.IPv6Address(dst))


def _lost_key(dst: bytes, proto: int, spi: int) -> int:
    # The full dst, not its index: indices are recycled, lost tuples outlive them.
    return int.from_bytes(dst, "big") << 40 | proto << 32 | spi


class Guard:
    """Outstanding (dst, proto, spi) tuples of a process; see the module doc.
    One made before fork() raises ForkedError in the child (make a new one):
    its tuples are the parent's."""

    def __init__(
        self,
        scope: Literal["spi", "dst"] = "spi",
        *,
        lost_capacity: int = LOST_CAPACITY,
        rng: random.Random | None = None,
    ) -> None:
        if scope not in ("spi", "dst"):
            raise InvalidRequest(f"scope={scope!r} must be 'spi' or 'dst'")
        self._scope: str = scope
        self._by_dst = scope == "dst"
        self._lost_capacity = check_int("lost_capacity", lost_capacity, 0, 1 << 62)
        self._rng = rng if rng is not None else random.Random()
        self._lock: threading.Lock | InertLock = threading.Lock()
        self._table: dict[int, int] = {}
        self._counts: dict[int, int] = {}  # key >> 32 -> outstanding
        self._dst_index: dict[bytes, int] = {}
        self._dsts: list[bytes] = []  # b"" marks a recycled index
        self._dst_refs: list[int] = []
        self._codes: list[tuple[int, int, int]] = []
        self._free_indices: list[int] = []
        self._by_state = [0, 0, 0]
        self._collisions = 0
        self._lost_total = 0
        self._lost: OrderedDict[int, None] = OrderedDict()
        self._deaths: OrderedDict[tuple[bytes, int, int, int, int], int] = OrderedDict()
        #: Held while one allocator acts on a death (renews or frees a tuple)
        #: and while one checks "still current?" before a DELSA or commit:
        #: with several watchers on one guard, a check must not fall between
        #: another watcher's ``seen_death`` and its freeing of the tuple.
        #: Taken before any socket lock.
        self.deaths_lock: threading.RLock | InertLock = threading.RLock()
        self._ports: OrderedDict[int, None] = OrderedDict()
        self._ports_version = 0
        self._port_followers: weakref.WeakSet[PortFollower] = weakref.WeakSet()
        # Random start: a token from another guard or process (pickled, or
        # built by hand) practically never equals a live one here.
        self._serial = self._rng.getrandbits(40) + 1
        _lifecycle.track(self)

    def _after_fork(self, parent: int) -> None:
        # The tuples are the parent's, perhaps half updated by a thread that
        # held the lock at fork time (and holds it for ever in the child).
        self._lock = InertLock("Guard", parent)
        self.deaths_lock = InertLock("Guard", parent)

    @property
    def scope(self) -> str:
        """ "spi" or "dst": what a tuple's uniqueness is checked against."""
        return self._scope

    # -- internals (lock held, arguments checked) --------------------------

    def _key(self, idx: int, proto: int, spi: int) -> int:
        return (idx << 40 | proto << 32 | spi) if self._by_dst else (proto << 32 | spi)

    def _scoped(self, dst: bytes, proto: int, spi: int) -> int | None:
        """The code outstanding under the scope, whoever's dst it is."""
        if self._by_dst:
            idx = self._dst_index.get(dst)
            if idx is None:
                return None
            return self._table.get(idx << 40 | proto << 32 | spi)
        return self._table.get(proto << 32 | spi)

    def _exact(self, dst: bytes, proto: int, spi: int) -> tuple[int, int] | None:
        """(key, code) when exactly this tuple is outstanding."""
        idx = self._dst_index.get(dst)
        if idx is None:
            return None
        key = self._key(idx, proto, spi)
        code = self._table.get(key)
        if code is None or code >> 2 & _IDX_MASK != idx:
            return None
        return key, code

    def _claim(self, dst: bytes, proto: int, spi: int, state: int, owner: int = 0) -> int:
        """The new entry's token (1 for FOREIGN), or 0 if the SPI is outstanding."""
        if self._scoped(dst, proto, spi) is not None:
            return 0
        idx = self._dst_index.get(dst)
        if idx is None:
            idx = self._intern(dst)
        key = self._key(idx, proto, spi)
        if state == _F:
            token = 1
            code = self._codes[idx][_F]
        else:
            serial = self._serial
            self._serial = serial + 1
            token = serial << OWNER_BITS | owner
            code = token << _TOK | idx << 2 | state
        bucket = key >> 32
        count = self._counts.get(bucket, 0) + 1
        # No call from here on: Python delivers a signal (KeyboardInterrupt)
        # only at a call or a loop, so the table and its counters cannot be
        # left disagreeing by a Ctrl-C.
        self._table[key] = code
        self._counts[bucket] = count
        self._dst_refs[idx] += 1
        self._by_state[state] += 1
        return token

    def _intern(self, dst: bytes) -> int:
        # Stores, subscripts and ``+=`` only, no call: a Ctrl-C between two
        # appends once left the three lists of unequal length, and every
        # later reservation for that dst failed with IndexError (see _claim).
        free = self._free_indices
        if free:
            idx = free[-1]
            self._dsts[idx] = dst
            del free[-1]
        else:
            idx = len(self._dsts)
            if idx > _IDX_MASK:
                raise InvalidRequest(f"more than {_IDX_MASK + 1:,} destinations outstanding in one guard")
            codes = (idx << 2 | _R, idx << 2 | _C, idx << 2 | _F)
            self._dsts += (dst,)
            self._dst_refs += (0,)
            self._codes += (codes,)
        self._dst_index[dst] = idx
        return idx

    def _reserve_all(self, dst: bytes, proto: int, spis: Sequence[int], owner: int) -> int | None:
        """Reserve every SPI of a batch at once under one serial: the batch's
        token, the same for all its tuples (a token identifies a reservation
        of its tuple, and no tuple is twice in a batch), so every entry
        shares one code object and costs its dict slot and key alone; or
        None, changing nothing, if any SPI is outstanding or repeated."""
        n = len(spis)
        idx = self._dst_index.get(dst)
        if idx is None:
            idx = self._intern(dst)
        base = self._key(idx, proto, 0)
        serial = self._serial
        token = serial << OWNER_BITS | owner
        # Keys made in C; one dict, which also tells a repeated SPI.
        codes = dict.fromkeys(map(base.__or__, spis), token << _TOK | idx << 2 | _R)
        if len(codes) != n or not codes.keys().isdisjoint(self._table.keys()):  # views: iterates the smaller
            if not self._dst_refs[idx]:
                self._release_index(idx)
            return None
        bucket = base >> 32
        count = self._counts.get(bucket, 0) + n
        lost = self._lost
        if lost:  # before any change: an interrupt here leaves hints only
            for spi in spis:
                lost.pop(_lost_key(dst, proto, spi), None)
        # Everything built before the first change; then stores only, and the
        # one call last: Python delivers a signal (KeyboardInterrupt) when a
        # call returns, so the table's update must find the counters agreeing.
        self._serial = serial + 1
        self._counts[bucket] = count
        self._dst_refs[idx] += n
        self._by_state[_R] += n
        self._table.update(codes)
        return token

    def _release_index(self, idx: int) -> None:
        del self._dst_index[self._dsts[idx]]
        self._dsts[idx] = b""
        self._free_indices.append(idx)

    def _drop(self, key: int, code: int) -> None:
        bucket = key >> 32
        left = self._counts[bucket] - 1
        idx = code >> 2 & _IDX_MASK
        # No call until the counters agree with the table again (see _claim).
        del self._table[key]
        self._by_state[code & 3] -= 1
        if left:
            self._counts[bucket] = left
        else:
            del self._counts[bucket]
        self._dst_refs[idx] -= 1
        if not self._dst_refs[idx]:
            self._release_index(idx)

    def _reserve(self, dst: bytes, proto: int, spi: int, owner: int = 0) -> int:
        token = self._claim(dst, proto, spi, _R, owner)
        if not token:
            self._collisions += 1
            return 0
        if self._lost:
            self._lost.pop(_lost_key(dst, proto, spi), None)
        return token

    def _current(self, dst: bytes, proto: int, spi: int, token: int | None) -> tuple[int, int] | None:
        """(key, code) of the tuple's entry if it is ours (not FOREIGN) and,
        given a token, that reservation's."""
        found = self._exact(dst, proto, spi)
        if found is None or found[1] & 3 == _F:
            return None
        if token is not None and found[1] >> _TOK != token:
            return None
        return found

    def _pick(self, proto: int, dst: bytes, lo: int, hi: int, step: int, rng: random.Random) -> int | None:
        size = (hi - lo) // step + 1
        if self._by_dst:
            idx = self._dst_index.get(dst)
            if idx is None:  # nothing outstanding for this dst: anything goes
                return lo + rng.randrange(size) * step
            base = idx << 40 | proto << 32
        else:
            base = proto << 32
        table = self._table
        if not self._counts.get(base >> 32):
            return lo + rng.randrange(size) * step
        for _ in range(min(PROBES, size)):
            value = lo + rng.randrange(size) * step
            if base | value not in table:
                return value
        # The scan stops at the first free value, and every value it passes is
        # outstanding, so it costs at most count_in() + 1 lookups.
        start = rng.randrange(size)
        for i in range(start, size):
            value = lo + i * step
            if base | value not in table:
                return value
        for i in range(start):
            value = lo + i * step
            if base | value not in table:
                return value
        return None

    def _check_range(self, lo: object, hi: object, step: object) -> tuple[int, int, int]:
        lo_i = check_int("lo", lo, 0, _SPI_MAX)
        hi_i = check_int("hi", hi, 0, _SPI_MAX)
        step_i = check_int("step", step, 0, _SPI_MAX)
        if lo_i > hi_i:
            raise InvalidRequest(f"lo {lo_i:#x} is greater than hi {hi_i:#x}")
        if step_i < 1:
            raise InvalidRequest(f"step={step_i} must be at least 1")
        return lo_i, hi_i, step_i

    # -- public API ----------------------------------------------------------

    def reserve(self, dst: bytes, proto: int, spi: int, *, owner: int = 0) -> int:
        """Mark the tuple RESERVED if it is free under the scope and return
        the reservation's token (never 0); 0 (a collision, counted) if it is
        outstanding in any state.  ``owner``: an id below 2**20 that
        ``owner_of(token)`` gives back."""
        dst, proto, spi = _check(dst, proto, spi)
        owner = check_int("owner", owner, 0, OWNER_MASK)
        with self._lock:
            return self._reserve(dst, proto, spi, owner)

    def reserve_many(self, dst: bytes, proto: int, spis: Sequence[int], *, owner: int = 0) -> list[int]:
        """``reserve`` for a batch under one lock; a repeated SPI collides with
        its first occurrence.  All SPIs are checked before any is reserved."""
        checked = [_check(dst, proto, spi) for spi in spis]
        owner = check_int("owner", owner, 0, OWNER_MASK)
        if not checked:
            return []
        return self.reserve_many_trusted(checked[0][0], checked[0][1], [s for _, _, s in checked], owner)

    def reserve_trusted(self, dst: bytes, proto: int, spi: int, owner: int = 0, box: list[Any] | None = None) -> int:
        """``reserve`` without argument checks, for a caller that validated
        dst, proto, spi and owner already (the allocator's per-SPI hot path).
        A free tuple of a known dst is claimed inline (``_claim`` unrolled);
        anything else goes the general way.  ``box``: the token is also put in
        ``box[1]`` before the lock is let go, so a caller that an exception
        leaves before it has the token can still free the tuple."""
        with self._lock:
            idx = self._dst_index.get(dst)
            if idx is not None:
                key = (idx << 40 | proto << 32 | spi) if self._by_dst else (proto << 32 | spi)
                table = self._table
                if key not in table:
                    serial = self._serial
                    token = serial << OWNER_BITS | owner
                    bucket = key >> 32
                    count = self._counts.get(bucket, 0) + 1
                    # No call until the counters agree with the table (see _claim).
                    self._serial = serial + 1
                    table[key] = token << _TOK | idx << 2 | _R
                    self._counts[bucket] = count
                    self._dst_refs[idx] += 1
                    self._by_state[_R] += 1
                    if box is not None:
                        box[1] = token
                    if self._lost:
                        self._lost.pop(_lost_key(dst, proto, spi), None)
                    return token
            # (An interrupt landing in _reserve after its claim loses the
            # token: the tuple then stays reserved, so never handed out twice,
            # but not free again either.  Rare: a dst's first tuple, or one
            # the guard had seen lost.)
            token = self._reserve(dst, proto, spi, owner)
            if box is not None:
                box[1] = token
            return token

    def reserve_many_trusted(self, dst: bytes, proto: int, spis: Sequence[int], owner: int = 0) -> list[int]:
        """``reserve_many`` without argument checks (see ``reserve_trusted``)."""
        token = self.reserve_batch(dst, proto, spis, owner)
        if token is not None:
            return [token] * len(spis)
        with self._lock:
            reserve = self._reserve
            return [reserve(dst, proto, spi, owner) for spi in spis]

    def reserve_batch(self, dst: bytes, proto: int, spis: Sequence[int], owner: int = 0) -> int | None:
        """Reserve every SPI of ``spis`` (one or more) as one batch, with one
        token for all, if every one is free and none repeated; else None and
        nothing reserved (``reserve_many_trusted`` then decides per SPI).
        Arguments trusted, as ``reserve_trusted``'s."""
        if not spis:
            return None
        with self._lock:
            return self._reserve_all(dst, proto, spis, owner)

    def stale_many(self, dst: bytes, proto: int, spis: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """Indices ``i`` whose (dst, proto, spis[i]) entry is not the
        reservation ``tokens[i]`` (``is_current`` for a batch, one lock);
        arguments trusted, as ``reserve_many_trusted``'s."""
        with self._lock:
            idx = self._dst_index.get(dst)
            if idx is None:
                return list(range(len(spis)))
            base = self._key(idx, proto, 0)
            get = self._table.get
            # A current entry's code is token << _TOK | idx << 2 | state, with
            # state RESERVED or COMMITTED.  Token 0 is no reservation's: a
            # FOREIGN code, or a free tuple's 0, would match it.
            return [
                i
                for i, (spi, t) in enumerate(zip(spis, tokens, strict=True))
                if not t or get(base | spi, 0) >> 2 != (t << _TOK - 2 | idx)
            ]

    def release_many(self, dst: bytes, proto: int, spis: Sequence[int], tokens: Sequence[int]) -> int:
        """``release`` with tokens for a batch of one (dst, proto), under one
        lock; how many were freed (those that were still current)."""
        with self._lock:
            idx = self._dst_index.get(dst)
            if idx is None:
                return 0
            base = self._key(idx, proto, 0)
            table = self._table
            doomed = []
            states = [0, 0, 0]
            for spi, t in zip(spis, tokens, strict=True):
                key = base | spi
                code = table.get(key, 0)
                if t and code >> 2 == (t << _TOK - 2 | idx):
                    doomed.append(key)
                    states[code & 3] += 1
            n = len(doomed)
            if not n:
                return 0
            bucket = base >> 32
            left = self._counts[bucket] - n
            # The counters (stores only), then one C-level pass over the
            # table: a signal is delivered when a call returns, never inside
            # that pass, so the table and its counters cannot be left
            # disagreeing.
            self._by_state[_R] -= states[_R]
            self._by_state[_C] -= states[_C]
            if left:
                self._counts[bucket] = left
            else:
                del self._counts[bucket]
            self._dst_refs[idx] -= n
            collections.deque(map(table.__delitem__, doomed), maxlen=0)
            if not self._dst_refs[idx]:
                self._release_index(idx)
            return n

    def token(self, dst: bytes, proto: int, spi: int) -> int:
        """The token of exactly this tuple's RESERVED or COMMITTED entry; 0 if
        it has none (free, FOREIGN, or another dst's under scope "spi")."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            found = self._current(dst, proto, spi, None)
            return 0 if found is None else found[1] >> _TOK

    def is_current(self, dst: bytes, proto: int, spi: int, token: int) -> bool:
        """Whether ``token`` is the reservation outstanding for this tuple."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            return self._current(dst, proto, spi, token) is not None

    def owner_dst(self, proto: int, spi: int, dst: bytes) -> bytes | None:
        """The dst recorded for the tuple outstanding under the scope, or None:
        equal to ``dst`` means the same kernel state (ALLOCSPI returned it
        again), different means another destination holds the SPI."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            code = self._scoped(dst, proto, spi)
            return None if code is None else self._dsts[code >> 2 & _IDX_MASK]

    def is_outstanding(self, dst: bytes, proto: int, spi: int) -> bool:
        """Whether the tuple (or, scope "spi", the SPI for any dst) is held."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            return self._scoped(dst, proto, spi) is not None

    def state(self, dst: bytes, proto: int, spi: int) -> State | None:
        """RESERVED, COMMITTED or FOREIGN for a held tuple; None if free."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            code = self._scoped(dst, proto, spi)
            return None if code is None else _STATES[code & 3]

    def is_lost(self, dst: bytes, proto: int, spi: int) -> bool:
        """Whether ``expire`` took this tuple and it was not reserved since
        (within the last ``lost_capacity`` expiries)."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            return _lost_key(dst, proto, spi) in self._lost

    def commit(self, dst: bytes, proto: int, spi: int, token: int | None = None) -> None:
        """RESERVED -> COMMITTED (already COMMITTED: nothing to do).  Raise
        ReservationLost when the tuple is not ours any more or, given a
        token, is no longer that reservation's."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            found = self._exact(dst, proto, spi)
            if found is not None and found[1] & 3 != _F and (token is None or found[1] >> _TOK == token):
                key, code = found
                if code & 3 == _R:
                    self._table[key] = code | _C
                    self._by_state[_R] -= 1
                    self._by_state[_C] += 1
                return
            what = f"proto {proto} spi {spi:#010x} dst {_dst_text(dst)}"
            if found is not None and found[1] & 3 != _F:
                raise ReservationLost(
                    f"{what}: this reservation is not current (its state expired or it was released, "
                    "and the SPI was reserved again since)"
                )
            if found is not None:
                raise ReservationLost(f"{what} is held by someone else, not reserved by us")
            if _lost_key(dst, proto, spi) in self._lost:
                raise ReservationLost(f"{what}: the larval state expired or was deleted before commit")
            holder = self._scoped(dst, proto, spi)
            if holder is not None:
                other = self._dsts[holder >> 2 & _IDX_MASK]
                raise ReservationLost(f"{what} is not reserved: the SPI is held for dst {_dst_text(other)}")
            raise ReservationLost(f"{what} is not reserved (never reserved, released or expired)")

    def release(self, dst: bytes, proto: int, spi: int, token: int | None = None) -> bool:
        """Free the tuple, whatever its state (given a token: only if it is
        that reservation's); whether it was freed."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            found = self._exact(dst, proto, spi) if token is None else self._current(dst, proto, spi, token)
            if found is None:
                return False
            self._drop(*found)
            return True

    def expire(self, dst: bytes, proto: int, spi: int) -> State | None:
        """The kernel says the state died: free it and return the state it had
        (RESERVED means a reservation was lost).  Our own tuples are
        remembered so a later ``commit`` raises ReservationLost."""
        found = self.expire_entry(dst, proto, spi)
        return None if found is None else found[0]

    def expire_entry(self, dst: bytes, proto: int, spi: int, token: int | None = None) -> tuple[State, int] | None:
        """``expire`` (given a token: only that reservation's entry), returning
        the state and the token it had (0 for FOREIGN)."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            found = self._exact(dst, proto, spi)
            if found is None or (token is not None and found[1] >> _TOK != token):
                return None
            key, code = found
            self._drop(key, code)
            state = code & 3
            if state == _R:
                self._lost_total += 1
            if state != _F and self._lost_capacity:
                self._lost[_lost_key(dst, proto, spi)] = None
                if len(self._lost) > self._lost_capacity:
                    self._lost.popitem(last=False)
            return _STATES[state], code >> _TOK

    def mark_foreign(self, dst: bytes, proto: int, spi: int) -> None:
        """Record a tuple someone else holds (seen in a SAD dump, or the kernel
        refused it).  A no-op if the SPI is already outstanding under the scope:
        our own entries are never overwritten."""
        dst, proto, spi = _check(dst, proto, spi)
        with self._lock:
            self._claim(dst, proto, spi, _F)

    def clear_foreign(self) -> None:
        """Forget every FOREIGN tuple, before a re-sync from a SAD dump."""
        with self._lock:
            if self._by_state[_F]:
                doomed = [(k, c) for k, c in self._table.items() if c & 3 == _F]
                for key, code in doomed:
                    self._drop(key, code)

    def pick_free(
        self,
        proto: int,
        dst: bytes,
        lo: int,
        hi: int,
        rng: random.Random | None = None,
        *,
        step: int = 1,
    ) -> int | None:
        """A value of ``lo, lo+step, ... <= hi`` not outstanding under the scope,
        or None if all are.  Random probes, then a scan from a random start
        (wrapping): uniform while the range is sparse, and the scan finds the
        last free values of a dense range.  Nothing is reserved: see
        ``reserve_free``.  ``step`` serves ``Partition(method="bits")``."""
        _, proto, _ = _check(dst, proto, 0)
        lo, hi, step = self._check_range(lo, hi, step)
        with self._lock:
            return self._pick(proto, dst, lo, hi, step, rng or self._rng)

    def reserve_free(
        self,
        dst: bytes,
        proto: int,
        lo: int,
        hi: int,
        rng: random.Random | None = None,
        *,
        step: int = 1,
        owner: int = 0,
    ) -> int | None:
        """``pick_free`` and ``reserve`` in one atomic step, so threads sharing
        the guard never pick the same value; None if the range is full (the
        reservation's token: ``token``)."""
        _, proto, _ = _check(dst, proto, 0)
        lo, hi, step = self._check_range(lo, hi, step)
        owner = check_int("owner", owner, 0, OWNER_MASK)
        return self.reserve_free_trusted(dst, proto, lo, hi, rng or self._rng, step, owner)

    def reserve_free_trusted(
        self,
        dst: bytes,
        proto: int,
        lo: int,
        hi: int,
        rng: random.Random,
        step: int = 1,
        owner: int = 0,
        box: list[Any] | None = None,
    ) -> int | None:
        """``reserve_free`` without argument checks (see ``reserve_trusted``).
        ``box``: the pick and its token are also put in ``box[2]`` and
        ``box[1]`` before the lock is let go: an interrupt (Ctrl-C) lands as
        the lock's release returns, and the caller could not free a tuple
        whose value it never got."""
        with self._lock:
            spi = self._pick(proto, dst, lo, hi, step, rng)
            if spi is not None:
                token = self._reserve(dst, proto, spi, owner)
                if box is not None:
                    box[1], box[2] = token, spi
            return spi

    def reserve_free_many(
        self, dst: bytes, proto: int, lo: int, hi: int, n: int, rng: random.Random | None = None, *, owner: int = 0
    ) -> list[tuple[int, int]]:
        """Up to ``n`` ``reserve_free`` picks under one lock, as (spi, token);
        fewer once the range is full."""
        _, proto, _ = _check(dst, proto, 0)
        lo, hi, _ = self._check_range(lo, hi, 1)
        owner = check_int("owner", owner, 0, OWNER_MASK)
        n = check_int("n", n, 0, 1 << 32)
        rng = rng or self._rng
        out: list[tuple[int, int]] = []
        with self._lock:
            for _ in range(n):
                spi = self._pick(proto, dst, lo, hi, 1, rng)
                if spi is None:
                    break
                out.append((spi, self._reserve(dst, proto, spi, owner)))
        return out

    def reserved(self, before: int | None = None, committed: bool = False) -> list[tuple[bytes, int, int]]:
        """A snapshot of the RESERVED tuples (and the COMMITTED ones too, if
        ``committed``) as (dst, proto, spi), e.g. to find the states that
        died while events were dropped.  ``before``: a ``mark()`` taken
        before a SAD dump; only reservations made before it (a later one's
        state may be missing from the dump only because it is newer)."""
        with self._lock:
            dsts = self._dsts
            limit = None if before is None else before << OWNER_BITS
            wanted = (_R, _C) if committed else (_R,)
            return [
                (dsts[code >> 2 & _IDX_MASK], key >> 32 & 0xFF, key & _SPI_MAX)
                for key, code in self._table.items()
                if code & 3 in wanted and (limit is None or code >> _TOK < limit)
            ]

    def mark(self) -> int:
        """A point in the guard's history: ``reserved(before=mark)`` leaves
        out every reservation made after it."""
        with self._lock:
            return self._serial

    def seen_death(
        self, dst: bytes, proto: int, spi: int, added: int, cause: int = 0, again: bool = False
    ) -> int | None:
        """Record a report of the death of this tuple's state added at
        ``added`` (the kernel's add time, seconds) of ``cause`` (0 for an
        expiry, the deleting request's port and seq for a DELSA), with the
        tuple's token now.  Returns None the first time; after that, the
        token recorded, which only ``again`` (a second death acted on)
        replaces: a copy that was skipped must not.

        Every allocator sharing the guard has a watcher and each receives
        the kernel's one EXPIRE or DELSA: a late copy must not end the
        tuple's next reservation.  The same token now means a copy: skip it.
        Another means either a copy, or the death of a newer state with the
        same add time and cause (made and deleted by ip(8) within a second):
        only the kernel can tell (is a state there?)."""
        dst, proto, spi = _check(dst, proto, spi)
        death = (dst, proto, spi, added, cause)
        with self._lock:
            found = self._current(dst, proto, spi, None)
            token = 0 if found is None else found[1] >> _TOK
            before = self._deaths.get(death)
            if before is not None and not again:
                return before
            self._deaths[death] = token
            self._deaths.move_to_end(death)
            if len(self._deaths) > DEATHS_KEPT:
                self._deaths.popitem(last=False)
            return before

    def adopt_port(self, portid: int) -> None:
        """A request socket of an allocator on this guard: the DELSAs it
        sends carry ``portid``, and are booked here as they are sent.
        Kept after the socket closes (its events may be read later), up to
        PORTS_KEPT, oldest out first.  The followers (watchers) hear of it
        before this returns, so a socket filter drops the new port's events
        from its first request on: a filter changed later lets through what
        was queued before it."""
        with self._lock:
            self._ports[portid] = None
            if len(self._ports) > PORTS_KEPT:
                self._ports.popitem(last=False)
            self._ports_version += 1
            followers = list(self._port_followers)
        for follower in followers:  # outside the lock: each takes it again in ports()
            follower.ports_changed()

    def follow_ports(self, follower: PortFollower) -> None:
        """Call ``follower.ports_changed()`` on each ``adopt_port`` from now
        on, while ``follower`` lives (a weak reference: no close needed)."""
        with self._lock:
            self._port_followers.add(follower)

    def ports(self) -> tuple[int, list[int]]:
        """(version, port ids) of ``adopt_port``, newest last: what the
        watchers' socket filters drop, refreshed when the version moves."""
        with self._lock:
            return self._ports_version, list(self._ports)

    def owns_port(self, portid: int) -> bool:
        """Whether a DELSA event came from an allocator on this guard (any
        other delete, even by this process, is an outside change to it)."""
        return portid != 0 and portid in self._ports

    def count_in(self, proto: int, dst: bytes) -> int:
        """Outstanding tuples of ``proto`` (scope "spi") or of (dst, proto)
        (scope "dst")."""
        _, proto, _ = _check(dst, proto, 0)
        with self._lock:
            if not self._by_dst:
                return self._counts.get(proto, 0)
            idx = self._dst_index.get(dst)
            return 0 if idx is None else self._counts.get(idx << 8 | proto, 0)

    def size_hint(self) -> int:
        """Tuples held, read without the lock (one dict's length, which the
        GIL keeps whole): exact, or out of date by a concurrent change."""
        return len(self._table)

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    @property
    def stats(self) -> GuardStats:
        """Counts of the tuples held, by state, and of collisions seen."""
        with self._lock:
            reserved, committed, foreign = self._by_state
            return GuardStats(
                outstanding=len(self._table),
                reserved=reserved,
                committed=committed,
                foreign=foreign,
                collisions=self._collisions,
                lost=self._lost_total,
            )

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Guard scope={self._scope!r} outstanding={s.outstanding} reserved={s.reserved} "
            f"committed={s.committed} foreign={s.foreign}>"
        )

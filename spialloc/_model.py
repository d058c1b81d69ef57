"""Friendly types (enums, Reservation) and the validation that turns user input
into a wire-ready request before any syscall is made."""

from __future__ import annotations

import array
import dataclasses
import enum
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterator, NamedTuple, Sequence, Tuple, Union, cast, overload

from . import _wire as w
from .errors import InvalidRequest

Address = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
MarkSpec = Union[int, Tuple[int, int], None]

U32_MAX = 0xFFFFFFFF


class Proto(enum.IntEnum):
    """IPsec protocols that take an SPI (or a CPI, for IPComp)."""

    ESP = w.IPPROTO_ESP
    AH = w.IPPROTO_AH
    COMP = w.IPPROTO_COMP


class Mode(enum.IntEnum):
    TRANSPORT = w.XFRM_MODE_TRANSPORT
    TUNNEL = w.XFRM_MODE_TUNNEL
    ROUTEOPTIMIZATION = w.XFRM_MODE_ROUTEOPTIMIZATION
    IN_TRIGGER = w.XFRM_MODE_IN_TRIGGER
    BEET = w.XFRM_MODE_BEET


class Direction(enum.IntEnum):
    IN = w.XFRM_SA_DIR_IN
    OUT = w.XFRM_SA_DIR_OUT


_PROTO_NAMES = {"esp": Proto.ESP, "ah": Proto.AH, "comp": Proto.COMP, "ipcomp": Proto.COMP}
_MODE_NAMES = {
    "transport": Mode.TRANSPORT,
    "tunnel": Mode.TUNNEL,
    "ro": Mode.ROUTEOPTIMIZATION,
    "in_trigger": Mode.IN_TRIGGER,
    "beet": Mode.BEET,
}
_DIR_NAMES = {"in": Direction.IN, "out": Direction.OUT}

#: SPIs 1-255 are reserved by IANA (RFC 4303 section 2.1), 0 means "none".
RESERVED_SPI_MAX = 0xFF
#: Default ESP/AH range, the one strongSwan uses: 2^28 values, so random picks
#: rarely collide even with a million SAs, SPIs stay recognisable in
#: ``ip xfrm state`` output, and the rest of the space is left to manually keyed
#: SAs, other daemons and HA partitioning.
DEFAULT_SPI_RANGE = (0xC0000000, 0xCFFFFFFF)
#: Default IPComp CPI range: RFC 3173 section 3.3 keeps 0-63 well known,
#: 64-255 reserved and 61440-65535 for private use; the kernel takes 16 bits.
DEFAULT_CPI_RANGE = (0x100, 0xEFFF)
CPI_MAX = 0xFFFF


def proto_or_int(p: int) -> Proto | int:
    """The kernel's protocol number as a Proto, or as it is (not an IPsec one)."""
    try:
        return Proto(p)
    except ValueError:
        return p


def mode_or_int(m: int) -> Mode | int:
    """The kernel's mode number as a Mode, or as it is (one newer than spialloc)."""
    try:
        return Mode(m)
    except ValueError:
        return m


def check_int(name: str, value: object, lo: int = 0, hi: int = U32_MAX, what: str | None = None) -> int:
    """The one integer validator: an int (not a bool) in ``lo..hi``, or
    InvalidRequest naming the value (``what`` says what was expected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        if what is not None:
            raise InvalidRequest(f"{name}={value!r} must be {what}")
        raise InvalidRequest(f"{name}={value!r} is out of range {lo}..{hi:#x}")
    return int(value)


def parse_proto(proto: object) -> Proto:
    if isinstance(proto, str):
        found = _PROTO_NAMES.get(proto.lower())
        if found is not None:
            return found
    elif isinstance(proto, int) and not isinstance(proto, bool):
        try:
            return Proto(proto)
        except ValueError:
            pass
    raise InvalidRequest(f"unknown proto {proto!r}: use 'esp', 'ah' or 'comp'")


def parse_mode(mode: object) -> Mode:
    if isinstance(mode, str):
        found = _MODE_NAMES.get(mode.lower())
        if found is not None:
            return found
    elif isinstance(mode, int) and not isinstance(mode, bool):
        try:
            return Mode(mode)
        except ValueError:
            pass
    raise InvalidRequest(f"unknown mode {mode!r}: use one of {', '.join(_MODE_NAMES)}")


def parse_direction(direction: object) -> Direction | None:
    if direction is None:
        return None
    if isinstance(direction, str):
        found = _DIR_NAMES.get(direction.lower())
        if found is not None:
            return found
    elif isinstance(direction, int) and not isinstance(direction, bool):
        try:
            return Direction(direction)
        except ValueError:
            pass
    raise InvalidRequest(f"unknown direction {direction!r}: use 'in' or 'out'")


def parse_address(name: str, value: object) -> IPAddress:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            pass
    raise InvalidRequest(f"{name}={value!r} is not an IPv4 or IPv6 address")


def parse_dst(value: object) -> IPAddress:
    """A destination, refusing IPv4-mapped IPv6 ones: the kernel keeps
    ``::ffff:192.0.2.1`` (AF_INET6) and ``192.0.2.1`` (AF_INET) as two states,
    but the guard keys IPv4 in the mapped form, so the two would share (and
    free) one guard entry.  Refused rather than keyed apart: no IPsec peer is
    reached through a mapped address."""
    addr = parse_address("dst", value)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise InvalidRequest(
            f"dst={value!r} is an IPv4-mapped IPv6 address: use the IPv4 address {addr.ipv4_mapped} "
            "(the kernel keeps the two as different states)"
        )
    return addr


def parse_mark(mark: MarkSpec) -> tuple[int, int] | None:
    if mark is None:
        return None
    if isinstance(mark, tuple) and len(mark) == 2:
        return (check_int("mark value", mark[0]), check_int("mark mask", mark[1]))
    if isinstance(mark, int) and not isinstance(mark, bool):
        return (check_int("mark", mark), U32_MAX)
    raise InvalidRequest(f"mark={mark!r} must be an int or a (value, mask) tuple")


def default_range(proto: Proto) -> tuple[int, int]:
    return DEFAULT_CPI_RANGE if proto is Proto.COMP else DEFAULT_SPI_RANGE


def parse_range(proto: Proto, spi_range: object, allow_reserved: bool = False) -> tuple[int, int]:
    if spi_range is None:
        return default_range(proto)
    if not isinstance(spi_range, (tuple, list, range)) or len(spi_range) < 1:
        raise InvalidRequest(f"spi_range={spi_range!r} must be a (min, max) pair")
    if isinstance(spi_range, range):
        if spi_range.step != 1:
            raise InvalidRequest(f"spi_range={spi_range!r} must have step 1")
        lo, hi = spi_range.start, spi_range.stop - 1
    elif len(spi_range) == 2:
        lo, hi = spi_range
    else:
        raise InvalidRequest(f"spi_range={spi_range!r} must be a (min, max) pair")
    lo = check_int("spi_range min", lo)
    hi = check_int("spi_range max", hi)
    if lo > hi:
        raise InvalidRequest(f"spi_range min {lo:#x} is greater than max {hi:#x}")
    if proto is Proto.COMP and hi > CPI_MAX:
        raise InvalidRequest(f"IPComp CPIs are 16 bits: spi_range max {hi:#x} > {CPI_MAX:#x}")
    if hi == 0:
        raise InvalidRequest("spi_range max 0: SPI 0 is never allocated")
    if lo == 0 and hi == U32_MAX:
        # The kernel computes max - min + 1 in 32 bits: 0 picks, always ENOENT.
        raise InvalidRequest("spi_range (0, 0xffffffff) wraps in the kernel; use min >= 1")
    if lo <= RESERVED_SPI_MAX and not allow_reserved:
        raise InvalidRequest(
            f"spi_range min {lo:#x} includes reserved values 0-255 (RFC 4303); pass allow_reserved=True to use them"
        )
    return (max(lo, 1), hi)


@dataclass(frozen=True, slots=True)
class Request:
    """A validated ALLOCSPI request; ``info`` and ``attrs`` are its wire bytes
    (sequence number and range are patched per message)."""

    dst: IPAddress
    src: IPAddress
    family: int
    proto: Proto
    mode: Mode
    reqid: int
    spi_min: int
    spi_max: int
    mark: tuple[int, int] | None
    if_id: int | None
    direction: Direction | None
    seq: int
    pcpu: int | None
    daddr: bytes
    saddr: bytes
    attrs: bytes
    gdst: bytes  # the guard's key for dst
    #: The whole ALLOCSPI message with nlmsg_seq 0: engines copy it and patch
    #: the sequence number (and range) per request.
    template: bytes = field(default=b"", compare=False, repr=False)
    #: The fields its reservations share (one object for all of them).
    shared: Shared | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.template:
            object.__setattr__(self, "template", self.message(0))
        fields = (
            self.dst,
            self.src,
            self.proto,
            self.mode,
            self.reqid,
            self.mark,
            self.if_id,
            self.direction,
            self.seq,
        )
        object.__setattr__(self, "shared", Shared(*fields))

    def message(self, nl_seq: int, spi_min: int | None = None, spi_max: int | None = None) -> bytes:
        """The whole message; the range arguments make the slow reference
        that tests compare the engines' in-place range patching against."""
        info = w.userspi_info(
            family=self.family,
            daddr=self.daddr,
            saddr=self.saddr,
            proto=self.proto,
            mode=self.mode,
            reqid=self.reqid,
            acq_seq=self.seq,
            spi_min=self.spi_min if spi_min is None else spi_min,
            spi_max=self.spi_max if spi_max is None else spi_max,
        )
        return w.allocspi(nl_seq, info, self.attrs)

    def with_seq(self, seq: int) -> Request:
        return dataclasses.replace(self, seq=seq, template=b"")

    def unspecified(self) -> Request:
        """The same attributes and protocol, aimed at the unspecified address
        with the protocol's whole range: a request no ACQUIRE and no daemon
        uses, for asking the kernel about the attributes themselves."""
        zero = bytes(len(self.daddr))
        any_addr = unpack_address(self.family, zero)
        lo, hi = (0x100, 0xFFFF) if self.proto is Proto.COMP else (0x100, U32_MAX)
        return dataclasses.replace(
            self,
            dst=any_addr,
            src=any_addr,
            daddr=zero,
            saddr=zero,
            gdst=guard_dst(self.family, zero),
            spi_min=lo,
            spi_max=hi,
            seq=0,
            mode=Mode.TRANSPORT,
            reqid=0,
            template=b"",
        )


def pack_address(addr: IPAddress) -> bytes:
    return addr.packed.ljust(16, b"\0")


#: The first 12 bytes of an IPv4-mapped IPv6 address (the guard's key for IPv4).
V4MAPPED = b"\0" * 10 + b"\xff\xff"


def guard_dst(family: int, raw: bytes) -> bytes:
    """The guard's 16-byte key for a destination: IPv4 as IPv4-mapped IPv6,
    so that no IPv6 address with twelve trailing zero bytes can alias one."""
    return V4MAPPED + raw[:4] if family == w.AF_INET else bytes(raw[:16])


def address_key(addr: IPAddress) -> bytes:
    return guard_dst(w.AF_INET if addr.version == 4 else w.AF_INET6, pack_address(addr))


def guard_dst_address(key: bytes) -> IPAddress:
    if key[:12] == V4MAPPED:
        return ipaddress.IPv4Address(key[12:16])
    return ipaddress.IPv6Address(key)


def unpack_address(family: int, raw: bytes) -> IPAddress:
    if family == w.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


def build_request(
    dst: object,
    proto: object = "esp",
    *,
    src: object = None,
    spi_range: object = None,
    mode: object = "transport",
    reqid: object = 0,
    mark: MarkSpec = None,
    if_id: object = None,
    direction: object = None,
    seq: object = 0,
    pcpu: object = None,
    allow_reserved: bool = False,
) -> Request:
    """Validate everything ALLOCSPI takes; raise InvalidRequest naming the bad value."""
    dst_a = parse_dst(dst)
    if src is None:
        src_a: IPAddress = ipaddress.ip_address(0) if dst_a.version == 4 else ipaddress.IPv6Address(0)
    else:
        src_a = parse_address("src", src)
        if src_a.version != dst_a.version:
            raise InvalidRequest(f"src {src_a} and dst {dst_a} are of different address families")
    p = parse_proto(proto)
    lo, hi = parse_range(p, spi_range, allow_reserved)
    m = parse_mark(mark)
    return Request(
        dst=dst_a,
        src=src_a,
        family=w.AF_INET if dst_a.version == 4 else w.AF_INET6,
        proto=p,
        mode=parse_mode(mode),
        reqid=check_int("reqid", reqid),
        spi_min=lo,
        spi_max=hi,
        mark=m,
        if_id=None if if_id is None else check_int("if_id", if_id),
        direction=parse_direction(direction),
        seq=check_int("seq", seq),
        pcpu=None if pcpu is None else check_int("pcpu", pcpu),
        daddr=pack_address(dst_a),
        gdst=guard_dst(w.AF_INET if dst_a.version == 4 else w.AF_INET6, pack_address(dst_a)),
        saddr=pack_address(src_a),
        attrs=w.sa_attrs(
            m,
            None if if_id is None else int(if_id),  # type: ignore[call-overload]
            None if direction is None else int(parse_direction(direction)),  # type: ignore[arg-type]
            None if pcpu is None else int(pcpu),  # type: ignore[call-overload]
        ),
    )


class Shared(NamedTuple):
    """What every reservation of one request has in common: made once per
    Request and referenced, not copied, by each Reservation."""

    dst: IPAddress
    src: IPAddress
    proto: Proto
    mode: Mode
    reqid: int
    mark: tuple[int, int] | None
    if_id: int | None
    direction: Direction | None
    seq: int


class Reservation:
    """An SPI the kernel allocated: a larval state (dst, proto, spi) in the SAD.

    ``spi`` is in host order.  Hand ``spi`` to your peer and install the SA
    with UPDSA using the same dst, proto, mark and direction; then call
    ``Allocator.commit(reservation)`` so the guard knows it is in use.

    ``token`` makes it this one reservation: the guard of the allocator that
    issued it keeps the token of the reservation current for its tuple, and
    ``commit``/``release`` refuse a handle that is not current (its state
    expired and the SPI was handed out again, or it was released) or was
    not issued by that allocator.  0 for an allocator without a guard.

    Immutable (assigning or deleting a field raises
    ``dataclasses.FrozenInstanceError``; it has no other attributes),
    hashable, picklable; equal when every field but ``allocated_at`` is.
    Four private slots behind read-only properties: the request's fields
    live in one ``Shared`` tuple that all reservations of a request share,
    so a reservation costs about 64 bytes.  Frozen by its properties, not by
    a ``__setattr__`` override: a reservation is the one object made per
    SPI, and four plain stores build it in half the time of four calls.
    """

    __slots__ = ("_spi", "_sh", "_at", "_tok")

    _spi: int
    _sh: Shared
    _at: float
    _tok: int

    def __init__(
        self,
        spi: int,
        dst: IPAddress,
        src: IPAddress,
        proto: Proto,
        mode: Mode = Mode.TRANSPORT,
        reqid: int = 0,
        mark: tuple[int, int] | None = None,
        if_id: int | None = None,
        direction: Direction | None = None,
        seq: int = 0,
        allocated_at: float | None = None,
        token: int = 0,
    ) -> None:
        self._spi = spi
        self._sh = Shared(dst, src, proto, mode, reqid, mark, if_id, direction, seq)
        self._at = time.time() if allocated_at is None else allocated_at
        self._tok = token

    @property
    def spi(self) -> int:
        """The SPI, host order (for IPComp, the CPI)."""
        return self._spi

    @property
    def allocated_at(self) -> float:
        """When the kernel allocated it (``time.time()``); not compared."""
        return self._at

    @property
    def token(self) -> int:
        """This reservation's token (see above); 0 without a guard."""
        return self._tok

    @property
    def _shared(self) -> Shared:
        return self._sh

    @property
    def dst(self) -> IPAddress:
        """The destination address (the SA's daddr)."""
        return self._sh.dst

    @property
    def src(self) -> IPAddress:
        """The source address asked for (0.0.0.0 or :: when none was given)."""
        return self._sh.src

    @property
    def proto(self) -> Proto:
        """ESP, AH or COMP (IPComp: ``spi`` is then a CPI)."""
        return self._sh.proto

    @property
    def mode(self) -> Mode:
        """The mode asked for (the larval state's; UPDSA sets the SA's)."""
        return self._sh.mode

    @property
    def reqid(self) -> int:
        """The reqid asked for."""
        return self._sh.reqid

    @property
    def mark(self) -> tuple[int, int] | None:
        """(value, mask) of the XFRMA_MARK asked for, or None."""
        return self._sh.mark

    @property
    def if_id(self) -> int | None:
        """The XFRMA_IF_ID asked for, or None."""
        return self._sh.if_id

    @property
    def direction(self) -> Direction | None:
        """The XFRMA_SA_DIR asked for, or None."""
        return self._sh.direction

    @property
    def seq(self) -> int:
        """The ACQUIRE seq the request bound (0: none)."""
        return self._sh.seq

    @property
    def family(self) -> int:
        """socket.AF_INET or AF_INET6, from ``dst``."""
        return w.AF_INET if self._sh.dst.version == 4 else w.AF_INET6

    @property
    def key(self) -> tuple[bytes, int, int]:
        """(dst key, proto, spi): the tuple the guard tracks."""
        return (guard_dst(self.family, pack_address(self.dst)), int(self.proto), self.spi)

    def __eq__(self, other: object) -> bool:
        if type(other) is not Reservation:
            return NotImplemented
        return self._spi == other._spi and self._tok == other._tok and self._sh == other._sh

    def __hash__(self) -> int:
        return hash((self._spi, self._sh, self._tok))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Reservation, (self._spi, *self._sh, self._at, self._tok))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(Shared._fields, self._sh, strict=True))
        return f"Reservation(spi={self._spi!r}, {fields}, allocated_at={self._at!r}, token={self._tok!r})"

    def __str__(self) -> str:
        return f"{self.proto.name.lower()} spi {self.spi:#010x} dst {self.dst}"


@dataclass(frozen=True)
class _ReservationFields:
    """Never made: the field list Reservation shows ``dataclasses``, so
    ``fields``, ``replace``, ``asdict`` and ``is_dataclass`` work on it as
    on the frozen dataclass it used to be."""

    spi: int
    dst: IPAddress
    src: IPAddress
    proto: Proto
    mode: Mode = Mode.TRANSPORT
    reqid: int = 0
    mark: tuple[int, int] | None = None
    if_id: int | None = None
    direction: Direction | None = None
    seq: int = 0
    allocated_at: float = field(default_factory=time.time, compare=False)
    token: int = 0


for _name in ("__dataclass_fields__", "__dataclass_params__", "__match_args__"):
    type.__setattr__(Reservation, _name, getattr(_ReservationFields, _name))


def _frozen(name: str) -> property:
    """``name``'s read-only property, given a setter and a deleter that raise
    FrozenInstanceError, as a frozen dataclass's fields do."""
    getter = Reservation.__dict__[name].fget

    def assign(self: Reservation, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def delete(self: Reservation) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    return property(getter, assign, delete, getter.__doc__)


# After the class, so that type checkers see plain read-only properties.
for _name in (*_ReservationFields.__dataclass_fields__, "_shared"):
    setattr(Reservation, _name, _frozen(_name))

_new = object.__new__


def reservation_from(req: Request, spi: int, now: float | None = None, token: int = 0) -> Reservation:
    r = _new(Reservation)
    r._spi = spi
    r._sh = req.shared  # type: ignore[assignment]  # set by Request.__post_init__
    r._at = time.time() if now is None else now
    r._tok = token
    return r


class Reservations(Sequence[Reservation]):
    """The reservations of one ``allocate_many``, in request order.

    A ``Sequence[Reservation]`` stored as the batch's arrays (4 bytes of SPI
    per entry, and 8 of token when the batch's tokens differ: one int when
    the guard reserved the batch whole, none without a guard) and the request they
    share: a ``Reservation`` object is built when an entry is read
    (``rs[i]``, iteration), so a batch nobody reads one by one costs no
    Python object per SPI.  Reading an entry twice gives two equal objects
    (not the same one).  ``spis`` gives the SPIs without building any.
    Hand the whole sequence (or a slice of it) to ``release``: it is
    released in bulk.  Compares equal to a list or tuple of the same
    reservations; pickles as a list.  Made by the allocator only.
    """

    __slots__ = ("_req", "_spis", "_tokens", "_at")

    _req: Request
    _spis: array.array[int]
    _tokens: array.array[int] | int | None  # per entry, one for all, or none (token 0)
    _at: float

    def __len__(self) -> int:
        return len(self._spis)

    @overload
    def __getitem__(self, i: int) -> Reservation: ...

    @overload
    def __getitem__(self, i: slice) -> Reservations: ...

    def __getitem__(self, i: int | slice) -> Reservation | Reservations:
        tokens = self._tokens
        if isinstance(i, slice):
            part = tokens if tokens is None or isinstance(tokens, int) else tokens[i]
            return batch_reservations(self._req, self._spis[i], part, self._at)
        spi = self._spis[i]  # IndexError, TypeError as a list's
        token = 0 if tokens is None else tokens if isinstance(tokens, int) else tokens[i]
        return reservation_from(self._req, spi, self._at, token)

    def __iter__(self) -> Iterator[Reservation]:
        req, at, tokens = self._req, self._at, self._tokens
        if tokens is None or isinstance(tokens, int):
            token = tokens or 0
            for spi in self._spis:
                yield reservation_from(req, spi, at, token)
        else:
            for spi, token in zip(self._spis, tokens, strict=True):
                yield reservation_from(req, spi, at, token)

    @property
    def spis(self) -> list[int]:
        """The SPIs (host order), in request order, without building a Reservation."""
        return self._spis.tolist()

    def _token_list(self) -> list[int]:
        """Each entry's token (0 without a guard)."""
        tokens = self._parts()[2]
        return [0] * len(self._spis) if tokens is None else list(tokens)

    def _parts(self) -> tuple[Request, array.array[int], list[int] | array.array[int] | None]:
        """(request, SPIs, each entry's token or None): what the allocator releases in bulk."""
        tokens = self._tokens
        return self._req, self._spis, [tokens] * len(self._spis) if isinstance(tokens, int) else tokens

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Reservations):
            return (
                len(self) == len(other)
                and self._spis == other._spis
                and self._token_list() == other._token_list()
                and (not len(self) or self[0] == other[0])
            )
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: object) -> list[Reservation]:
        """As a list's ``+``: a list of both (with a list or Reservations)."""
        if isinstance(other, (list, Reservations)):
            return [*self, *other]
        return NotImplemented

    def __radd__(self, other: object) -> list[Reservation]:
        if isinstance(other, list):
            return [*other, *self]
        return NotImplemented

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))

    def __repr__(self) -> str:
        req = self._req
        return f"<Reservations: {len(self)} {req.proto.name.lower()} SPIs, dst {req.dst}>"


def batch_reservations(
    req: Request, spis: array.array[int], tokens: array.array[int] | int | None, at: float
) -> Reservations:
    """A batch's Reservations over its arrays (``tokens`` None: no guard)."""
    rs = object.__new__(Reservations)
    rs._req, rs._spis, rs._tokens, rs._at = req, spis, tokens, at
    return rs


def joined_batches(parts: Sequence[Reservations]) -> Reservations:
    """Batches of one request (the chunks of ``AsyncAllocator.allocate_many``
    or of the command's ``alloc``) as one, in order, still arrays.  Each
    chunk has its own token, so the tokens become one array;
    ``allocated_at`` is the first chunk's, the earliest (a caller timing a
    larval state's lifetime from it errs early).  At least one part."""
    parts = [p for p in parts if len(p)] or [parts[0]]
    if len(parts) == 1:
        return parts[0]
    spis: array.array[int] = array.array("I")
    tokens: array.array[int] | None = None if parts[0]._tokens is None else array.array("Q")
    for p in parts:
        spis.extend(p._spis)
        if tokens is not None:
            t = p._tokens
            tokens.extend(array.array("Q", [t]) * len(p) if isinstance(t, int) else cast("array.array[int]", t))
    return batch_reservations(parts[0]._req, spis, tokens, parts[0]._at)


def batch_without(rs: Reservations, skip: Collection[int]) -> Reservations:
    """``rs`` but the entries at indices ``skip``."""
    keep = [i for i in range(len(rs)) if i not in skip]
    spis = rs._spis
    tokens = rs._tokens
    if tokens is not None and not isinstance(tokens, int):
        tokens = array.array("Q", [tokens[i] for i in keep])
    return batch_reservations(rs._req, array.array("I", [spis[i] for i in keep]), tokens, rs._at)


#: "No limit" in a lifetime (the kernel's XFRM_INF).
INF = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Selector:
    """A traffic selector (struct xfrm_selector): which packets a policy or
    state applies to.  Ports are in host order; 0 and a prefix length of 0
    mean "any"."""

    src: IPAddress
    dst: IPAddress
    prefixlen_s: int
    prefixlen_d: int
    proto: int  # upper-layer protocol, 0 = any
    sport: int
    dport: int
    ifindex: int
    user: int = 0  # uid of a socket policy's owner

    @classmethod
    def from_wire(cls, sel: w.Selector, family: int) -> Selector:
        """``family``: the one to read the addresses in when the selector
        has none (a selector of all zeros)."""
        fam = sel.family or family
        return cls(
            src=unpack_address(fam, sel.saddr),
            dst=unpack_address(fam, sel.daddr),
            prefixlen_s=sel.prefixlen_s,
            prefixlen_d=sel.prefixlen_d,
            proto=sel.proto,
            sport=sel.sport,
            dport=sel.dport,
            ifindex=sel.ifindex,
            user=sel.user,
        )

    def __str__(self) -> str:
        out = f"src {self.src}/{self.prefixlen_s} dst {self.dst}/{self.prefixlen_d}"
        if self.proto:
            out += f" proto {self.proto}"
        if self.sport:
            out += f" sport {self.sport}"
        if self.dport:
            out += f" dport {self.dport}"
        if self.ifindex:
            out += f" dev {self.ifindex}"
        return out


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Limits of a state or policy (struct xfrm_lifetime_cfg): soft ones
    make the kernel send a soft EXPIRE, hard ones delete.  ``INF``: no
    limit; 0 seconds: no time limit.  A larval state's
    ``hard_add_expires`` is ``net.core.xfrm_acq_expires``: when it dies."""

    soft_bytes: int = INF
    hard_bytes: int = INF
    soft_packets: int = INF
    hard_packets: int = INF
    soft_add_expires: int = 0
    hard_add_expires: int = 0
    soft_use_expires: int = 0
    hard_use_expires: int = 0

    @classmethod
    def from_wire(cls, lft: w.Lifetime) -> Lifetime:
        """From the eight numbers of struct xfrm_lifetime_cfg (``_wire``)."""
        return cls(*lft)


@dataclass(frozen=True, slots=True)
class KernelState:
    """A state in the kernel's SAD, as GETSA or a dump reports it."""

    spi: int
    dst: IPAddress
    src: IPAddress
    proto: int  # a Proto value, or another protocol number for non-IPsec states
    mode: int
    reqid: int
    mark: tuple[int, int] | None
    if_id: int | None
    direction: Direction | None
    acquire_seq: int  # km.seq: non-zero for states made by a kernel ACQUIRE
    larval: bool  # no algorithms: made by ALLOCSPI or ACQUIRE, not installed
    added: int  # seconds since the epoch
    pcpu: int | None = None  # XFRMA_SA_PCPU: the CPU of a per-CPU SA
    selector: Selector | None = None
    lifetime: Lifetime = field(default_factory=Lifetime)
    used: int = 0  # seconds since the epoch the state last carried a packet, 0: never
    byte_count: int = 0  # what it carried
    packet_count: int = 0
    replay_window: int = 0

    @classmethod
    def from_wire(cls, sa: w.SaInfo) -> KernelState:
        """From a decoded NEWSA reply, dump entry or event (``_wire.SaInfo``)."""
        return cls(
            spi=sa.spi,
            dst=unpack_address(sa.family, sa.daddr),
            src=unpack_address(sa.family, sa.saddr),
            proto=proto_or_int(sa.proto),
            mode=mode_or_int(sa.mode),
            reqid=sa.reqid,
            mark=sa.mark,
            if_id=sa.if_id,
            direction=Direction(sa.direction) if sa.direction in (1, 2) else None,
            acquire_seq=sa.seq,
            larval=sa.larval,
            added=sa.add_time,
            pcpu=sa.pcpu,
            selector=Selector.from_wire(sa.selector, sa.family),
            lifetime=Lifetime.from_wire(sa.lifetime),
            used=sa.current[3],
            byte_count=sa.current[0],
            packet_count=sa.current[1],
            replay_window=sa.replay_window,
        )

    def reservation(self) -> Reservation:
        """A handle for this state, with no identity (token 0): what an
        allocator without a guard releases by key; a guarded allocator
        refuses it (it did not issue it)."""
        proto = self.proto if isinstance(self.proto, Proto) else Proto(self.proto)
        return Reservation(
            spi=self.spi,
            dst=self.dst,
            src=self.src,
            proto=proto,
            mode=Mode(self.mode),
            reqid=self.reqid,
            mark=self.mark,
            if_id=self.if_id,
            direction=self.direction,
            seq=self.acquire_seq,
            allocated_at=float(self.added),
        )

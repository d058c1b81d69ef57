"""Kernel wire layouts for NETLINK_XFRM: the only module that packs or unpacks bytes.

Layouts are x86_64/aarch64 (LP64, little or big endian host order as the kernel
uses native order for netlink).  ``tests/unit/test_native.py`` checks every size
and offset here against the C compiler via the cffi extension, so a mismatch is a
test failure rather than a silent misparse.

::

    struct nlmsghdr (16)          struct xfrm_userspi_info (232)
    +--------+------+-------+     +------------------------------+
    | len u32|type16|flags16|     | struct xfrm_usersa_info info | 224
    +--------+------+-------+     |   sel      @0   (56)         |
    | seq u32| pid u32      |     |   id       @56  (24) spi BE  |
    +--------+--------------+     |   saddr    @80  (16)         |
                                  |   lft @96 curlft @160 ...    |
    struct nlattr (4)             |   seq @204 reqid @208        |
    +--------+--------+-----      |   family @212 mode @214      |
    | len u16| type16 | value     +------------------------------+
    +--------+--------+--(pad 4)  | min u32 @224 | max u32 @228  |
                                  +------------------------------+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import DecodeError

# --- netlink core -----------------------------------------------------------
NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: original payload left out
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow

NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2

# --- xfrm message types -----------------------------------------------------
XFRM_MSG_NEWSA = 16
XFRM_MSG_DELSA = 17
XFRM_MSG_GETSA = 18
XFRM_MSG_ALLOCSPI = 22
XFRM_MSG_ACQUIRE = 23
XFRM_MSG_EXPIRE = 24
XFRM_MSG_UPDSA = 26
XFRM_MSG_FLUSHSA = 28

# --- xfrm attributes --------------------------------------------------------
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_SEC_CTX = 8
XFRMA_REPLAY_VAL = 10
XFRMA_POLICY_TYPE = 16
XFRMA_MARK = 21
XFRMA_PROTO = 25
XFRMA_ADDRESS_FILTER = 26
XFRMA_OFFLOAD_DEV = 28
XFRMA_IF_ID = 31
XFRMA_SA_DIR = 33
XFRMA_SA_PCPU = 35

# --- multicast groups (group number; bind mask is 1 << (group - 1)) ----------
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3

# --- IPsec protocol numbers and modes ----------------------------------------
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
AF_INET = 2
AF_INET6 = 10
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_MODE_ROUTEOPTIMIZATION = 2
XFRM_MODE_IN_TRIGGER = 3
XFRM_MODE_BEET = 4
XFRM_SA_DIR_IN = 1
XFRM_SA_DIR_OUT = 2

# --- struct layouts -----------------------------------------------------------
NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
BE32 = struct.Struct("!I")
XFRM_MARK = struct.Struct("=II")

NLMSGHDR_LEN = 16
NLATTR_LEN = 4
XFRM_SELECTOR_LEN = 56
XFRM_ID_LEN = 24
XFRM_LIFETIME_CFG_LEN = 64
XFRM_LIFETIME_CUR_LEN = 32
XFRM_STATS_LEN = 12
XFRM_USERSA_INFO_LEN = 224
XFRM_USERSPI_INFO_LEN = 232
XFRM_USERSA_ID_LEN = 24
XFRM_MARK_LEN = 8
XFRM_USER_ACQUIRE_LEN = 280
XFRM_USER_EXPIRE_LEN = 232
XFRM_USERPOLICY_INFO_LEN = 168
XFRM_USER_TMPL_LEN = 64
NLMSGERR_LEN = 20

# Offsets inside struct xfrm_usersa_info (also the first 224 bytes of
# xfrm_userspi_info and of xfrm_user_expire).
SA_SEL = 0
SA_LFT = 96
SA_ID_DADDR = 56
SA_ID_SPI = 72
SA_ID_PROTO = 76
SA_SADDR = 80
SA_CURLFT = 160
SA_SEQ = 204
SA_REQID = 208
SA_FAMILY = 212
SA_MODE = 214
SA_REPLAY_WINDOW = 215
SA_FLAGS = 216
SPI_MIN = 224
SPI_MAX = 228
EXPIRE_HARD = 224

# Offsets inside struct xfrm_user_acquire
ACQ_ID = 0
ACQ_SADDR = 24
ACQ_SEL = 40
ACQ_POLICY = 96
ACQ_ALGOS = 264  # aalgos, ealgos, calgos of the template that triggered
ACQ_SEQ = 276

# Offsets inside struct xfrm_userpolicy_info
POL_LFT = 56
POL_PRIORITY = 152  # priority, index, dir, action, flags, share

# Offsets inside struct xfrm_user_tmpl
TMPL_FAMILY = 24
TMPL_REQID = 44
TMPL_MODE = 48

# Offsets inside the ALLOCSPI message (header included): what the batch
# engines patch per request.
MSG_SEQ = 8
MSG_SPI_MIN = NLMSGHDR_LEN + SPI_MIN
MSG_SPI_MAX = NLMSGHDR_LEN + SPI_MAX
# Offset of id.spi inside a NEWSA reply, header included.
MSG_REPLY_SPI = NLMSGHDR_LEN + SA_ID_SPI

# daddr(16) spi(BE) proto pad3 | saddr(16) at 80; used to read replies.
_SA_HEAD = struct.Struct("=16s4sB3x16s")  # at SA_ID_DADDR
_SA_TAIL = struct.Struct("=IIHBBB")  # seq reqid family mode replay_window flags
_CURLFT = struct.Struct("=QQQQ")  # bytes packets add_time use_time
_SELECTOR = struct.Struct("=16s16s2s2s2s2sHBBB3xiI")  # ports are big endian
_LIFETIME_CFG = struct.Struct("=8Q")
_POLICY_TAIL = struct.Struct("=IIBBBB")  # at POL_PRIORITY
_ALGOS = struct.Struct("=III")
# daddr spi proto | family | saddr reqid mode share optional | aalgos ealgos calgos
_TMPL = struct.Struct("=16s4sB3xH2x16sIBBBxIII")
_OFFLOAD = struct.Struct("=iB")  # struct xfrm_user_offload (ifindex, flags)
_USERSA_ID = struct.Struct("=16s4sHB1x")
_SPI_RANGE = struct.Struct("=II")


def align4(n: int) -> int:
    return (n + 3) & ~3


# --- encoding ---------------------------------------------------------------


def attr(kind: int, value: bytes) -> bytes:
    length = NLATTR_LEN + len(value)
    return NLATTR.pack(length, kind) + value + b"\0" * (align4(length) - length)


def sa_attrs(
    mark: tuple[int, int] | None,
    if_id: int | None,
    direction: int | None,
    pcpu: int | None,
) -> bytes:
    """Attributes ALLOCSPI (and later UPDSA) take, in the kernel's order."""
    out = b""
    if mark is not None:
        out += attr(XFRMA_MARK, XFRM_MARK.pack(*mark))
    if if_id is not None:
        out += attr(XFRMA_IF_ID, U32.pack(if_id))
    if direction is not None:
        out += attr(XFRMA_SA_DIR, bytes((direction,)))
    if pcpu is not None:
        out += attr(XFRMA_SA_PCPU, U32.pack(pcpu))
    return out


def message(kind: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR_LEN + len(payload), kind, flags, seq, pid) + payload


def userspi_info(
    *,
    family: int,
    daddr: bytes,
    saddr: bytes,
    proto: int,
    mode: int,
    reqid: int,
    acq_seq: int,
    spi_min: int,
    spi_max: int,
) -> bytes:
    """struct xfrm_userspi_info with everything the kernel reads set.

    The kernel reads id.daddr, id.proto, saddr, family, mode, reqid and seq of
    the embedded usersa_info; the selector is left zero, as ip(8) does.
    """
    info = bytearray(XFRM_USERSPI_INFO_LEN)
    _SA_HEAD.pack_into(info, SA_ID_DADDR, daddr, b"\0\0\0\0", proto, saddr)
    _SA_TAIL.pack_into(info, SA_SEQ, acq_seq, reqid, family, mode, 0, 0)
    _SPI_RANGE.pack_into(info, SPI_MIN, spi_min, spi_max)
    return bytes(info)


def allocspi(seq: int, info: bytes, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    return message(XFRM_MSG_ALLOCSPI, flags, seq, info + attrs)


def usersa_id(daddr: bytes, spi: int, family: int, proto: int) -> bytes:
    return _USERSA_ID.pack(daddr, BE32.pack(spi), family, proto)


def delsa(seq: int, sa_id: bytes, attrs: bytes, flags: int = NLM_F_REQUEST | NLM_F_ACK, portid: int = 0) -> bytes:
    return message(XFRM_MSG_DELSA, flags, seq, sa_id + attrs, portid)


def getsa(seq: int, sa_id: bytes, attrs: bytes) -> bytes:
    return message(XFRM_MSG_GETSA, NLM_F_REQUEST, seq, sa_id + attrs)


# --- socket filter ---------------------------------------------------------------

#: struct sock_filter { __u16 code; __u8 jt, jf; __u32 k; } (classic BPF)
SOCK_FILTER = struct.Struct("=HBBI")
_BPF_LDH_ABS, _BPF_LDW_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x28, 0x20, 0x15, 0x06
#: Most port ids one filter names; more are dropped in Python instead.
FILTER_PORTS = 64


def filter_own_events(ports: Sequence[int]) -> bytes:
    """A classic BPF program for an event socket: drop NEWSA (nothing for
    us) and the DELSAs whose nlmsg_pid is one of ``ports`` (our own
    deletes), keep everything else.  BPF loads in network byte order and
    the header is in host order, hence the swapped constants."""
    ports = list(ports)[-FILTER_PORTS:]
    n = len(ports)
    # 0 ldh [type]; 1 NEWSA? -> drop; 2 DELSA? -> 3 else accept; 3 ld [pid];
    # 4.. one jeq per port -> drop; then accept; drop.
    accept, drop = 4 + n, 5 + n
    ins = [
        (_BPF_LDH_ABS, 0, 0, 4),
        (_BPF_JEQ_K, drop - 2, 0, _swap16(XFRM_MSG_NEWSA)),
        (_BPF_JEQ_K, 0, accept - 3, _swap16(XFRM_MSG_DELSA)),
        (_BPF_LDW_ABS, 0, 0, 12),
    ]
    for i, port in enumerate(ports):
        at = 4 + i
        ins.append((_BPF_JEQ_K, drop - at - 1, 0, _swap32(port)))
    ins += [(_BPF_RET_K, 0, 0, 0xFFFFFFFF), (_BPF_RET_K, 0, 0, 0)]
    return b"".join(SOCK_FILTER.pack(*i) for i in ins)


def _swap16(v: int) -> int:
    return int.from_bytes(U16.pack(v), "big")


def _swap32(v: int) -> int:
    return int.from_bytes(U32.pack(v & 0xFFFFFFFF), "big")


#: struct xfrm_address_filter { xfrm_address_t saddr, daddr; __u16 family; __u8 splen, dplen; }
ADDRESS_FILTER = struct.Struct("=16s16sHBB")


def getsa_dump(seq: int, to: tuple[int, bytes, int] | None = None) -> bytes:
    """A SAD dump; ``to`` = (family, daddr, proto) asks the kernel for the
    states of one destination and protocol only (xfrm_dump_sa reads its
    filters after a struct xfrm_usersa_info, whose contents it ignores)."""
    if to is None:
        return message(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, seq, b"")
    family, daddr, proto = to
    filt = ADDRESS_FILTER.pack(bytes(16), daddr, family, 0, 32 if family == AF_INET else 128)
    body = bytes(XFRM_USERSA_INFO_LEN) + attr(XFRMA_ADDRESS_FILTER, filt) + attr(XFRMA_PROTO, bytes([proto]))
    return message(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def patch_seq(buf: bytearray, offset: int, seq: int) -> None:
    U32.pack_into(buf, offset + MSG_SEQ, seq)


def patch_range(buf: bytearray, offset: int, spi_min: int, spi_max: int) -> None:
    _SPI_RANGE.pack_into(buf, offset + MSG_SPI_MIN, spi_min, spi_max)


# --- decoding ---------------------------------------------------------------


def iter_messages(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, int, memoryview]]:
    """Yield (type, flags, seq, pid, payload) for each message in a datagram."""
    view = memoryview(buf)
    off = 0
    end = len(view)
    while end - off >= NLMSGHDR_LEN:
        length, kind, flags, seq, pid = NLMSGHDR.unpack_from(view, off)
        if length < NLMSGHDR_LEN or length > end - off:
            raise DecodeError(f"netlink message length {length} at offset {off} exceeds datagram of {end}")
        yield kind, flags, seq, pid, view[off + NLMSGHDR_LEN : off + length]
        off += align4(length)
    if off < end:
        raise DecodeError(f"{end - off} trailing bytes after last netlink message")


def iter_attrs(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, memoryview]]:
    """Yield (type, value) for each attribute; nested/byteorder bits masked off."""
    view = memoryview(buf)
    off = 0
    end = len(view)
    while end - off >= NLATTR_LEN:
        length, kind = NLATTR.unpack_from(view, off)
        if length < NLATTR_LEN or length > end - off:
            raise DecodeError(f"attribute length {length} at offset {off} exceeds {end}")
        yield kind & 0x3FFF, view[off + NLATTR_LEN : off + length]
        off += align4(length)
    if off < end:
        raise DecodeError(f"{end - off} trailing bytes after last attribute")


def decode_error(payload: memoryview, flags: int) -> tuple[int, str | None, int | None]:
    """struct nlmsgerr + ext-ack TLVs -> (errno (positive, 0 = ack), text, seq of request)."""
    if len(payload) < NLMSGERR_LEN:
        raise DecodeError(f"NLMSG_ERROR payload of {len(payload)} bytes, need {NLMSGERR_LEN}")
    (err,) = I32.unpack_from(payload, 0)
    if err > 0 or err == -(2**31):
        raise DecodeError(f"NLMSG_ERROR error field {err} is not 0 or a negative errno")
    orig_len, _, _, orig_seq, _ = NLMSGHDR.unpack_from(payload, 4)
    text = None
    if flags & NLM_F_ACK_TLVS:
        skip = 4 + (NLMSGHDR_LEN if flags & NLM_F_CAPPED else orig_len)
        if skip > len(payload):
            raise DecodeError("extended ack offset beyond NLMSG_ERROR payload")
        for kind, value in iter_attrs(payload[align4(skip) :]):
            if kind == NLMSGERR_ATTR_MSG and text is None:  # the first, as the C parser
                text = bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    return -err, text, orig_seq


def decode_alloc_reply(payload: memoryview) -> int:
    """SPI (host order) from the usersa_info of a NEWSA reply."""
    if len(payload) < XFRM_USERSA_INFO_LEN:
        raise DecodeError(f"NEWSA payload of {len(payload)} bytes, need {XFRM_USERSA_INFO_LEN}")
    return int(BE32.unpack_from(payload, SA_ID_SPI)[0])


@dataclass(frozen=True, slots=True)
class Selector:
    family: int
    daddr: bytes
    saddr: bytes
    dport: int
    sport: int
    prefixlen_d: int
    prefixlen_s: int
    proto: int
    ifindex: int
    user: int = 0


#: A selector of all zeros (what a dump entry without one would carry).
NO_SELECTOR = Selector(0, bytes(16), bytes(16), 0, 0, 0, 0, 0, 0)
#: struct xfrm_lifetime_cfg as eight numbers; "no limit" is 2**64 - 1.
Lifetime = tuple[int, int, int, int, int, int, int, int]
NO_LIFETIME: Lifetime = (0, 0, 0, 0, 0, 0, 0, 0)


def decode_selector(buf: memoryview, offset: int = 0) -> Selector:
    if len(buf) - offset < XFRM_SELECTOR_LEN:
        raise DecodeError(f"selector of {len(buf) - offset} bytes, need {XFRM_SELECTOR_LEN}")
    (daddr, saddr, dport, _, sport, _, family, plen_d, plen_s, proto, ifindex, user) = _SELECTOR.unpack_from(
        buf, offset
    )
    return Selector(
        family=family,
        daddr=daddr,
        saddr=saddr,
        dport=int.from_bytes(dport, "big"),
        sport=int.from_bytes(sport, "big"),
        prefixlen_d=plen_d,
        prefixlen_s=plen_s,
        proto=proto,
        ifindex=ifindex,
        user=user,
    )


@dataclass(frozen=True, slots=True)
class SaInfo:
    """One state as the kernel reports it (NEWSA reply, dump entry, expire)."""

    family: int
    daddr: bytes  # 16 bytes, IPv4 in the first four
    saddr: bytes
    spi: int  # host order
    proto: int
    mode: int
    reqid: int
    seq: int  # km.seq: non-zero for kernel ACQ states
    flags: int
    add_time: int  # seconds since the epoch
    mark: tuple[int, int] | None
    if_id: int | None
    direction: int | None
    pcpu: int | None
    larval: bool  # no algorithms attached: only ALLOCSPI/ACQUIRE made it
    selector: Selector = NO_SELECTOR
    lifetime: Lifetime = NO_LIFETIME
    current: tuple[int, int, int, int] = (0, 0, 0, 0)  # bytes, packets, add_time, use_time
    replay_window: int = 0


def decode_sa(payload: memoryview) -> SaInfo:
    if len(payload) < XFRM_USERSA_INFO_LEN:
        raise DecodeError(f"usersa_info payload of {len(payload)} bytes, need {XFRM_USERSA_INFO_LEN}")
    daddr, spi, proto, saddr = _SA_HEAD.unpack_from(payload, SA_ID_DADDR)
    seq, reqid, family, mode, replay_window, flags = _SA_TAIL.unpack_from(payload, SA_SEQ)
    current = _CURLFT.unpack_from(payload, SA_CURLFT)
    mark = if_id = direction = pcpu = None
    larval = True
    for kind, value in iter_attrs(payload[XFRM_USERSA_INFO_LEN:]):
        if kind == XFRMA_MARK and len(value) >= XFRM_MARK_LEN:
            mark = XFRM_MARK.unpack_from(value)
        elif kind == XFRMA_IF_ID and len(value) >= 4:
            if_id = U32.unpack_from(value)[0]
        elif kind == XFRMA_SA_DIR and len(value) >= 1:
            direction = value[0]
        elif kind == XFRMA_SA_PCPU and len(value) >= 4:
            pcpu = U32.unpack_from(value)[0]
        elif kind in (1, 2, 3, 18, 20):  # ALG_AUTH, ALG_CRYPT, ALG_COMP, ALG_AEAD, ALG_AUTH_TRUNC
            larval = False
    return SaInfo(
        family=family,
        daddr=daddr,
        saddr=saddr,
        spi=BE32.unpack(spi)[0],
        proto=proto,
        mode=mode,
        reqid=reqid,
        seq=seq,
        flags=flags,
        add_time=current[2],
        mark=mark,
        if_id=if_id,
        direction=direction,
        pcpu=pcpu,
        larval=larval,
        selector=decode_selector(payload, SA_SEL),
        lifetime=_LIFETIME_CFG.unpack_from(payload, SA_LFT),
        current=current,
        replay_window=replay_window,
    )


@dataclass(frozen=True, slots=True)
class TmplInfo:
    """struct xfrm_user_tmpl: one SA a policy asks for."""

    daddr: bytes
    spi: int
    proto: int
    family: int
    saddr: bytes
    reqid: int
    mode: int
    share: int
    optional: int
    aalgos: int
    ealgos: int
    calgos: int


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """The parts of struct xfrm_userpolicy_info an ACQUIRE carries."""

    selector: Selector
    lifetime: Lifetime
    priority: int
    index: int
    dir: int
    action: int
    flags: int
    share: int


@dataclass(frozen=True, slots=True)
class AcquireInfo:
    daddr: bytes
    spi: int
    proto: int
    saddr: bytes
    family: int  # of the SA: the matching template's, else the selector's
    selector: Selector
    reqid: int  # the matching template's reqid (0 when no template attribute)
    mode: int | None
    seq: int
    policy: PolicyInfo | None = None
    aalgos: int = 0
    ealgos: int = 0
    calgos: int = 0
    templates: tuple[TmplInfo, ...] = ()
    mark: tuple[int, int] | None = None
    if_id: int | None = None
    pcpu: int | None = None
    policy_type: int | None = None
    sec_ctx: bytes | None = None
    offload: tuple[int, int] | None = None


def decode_tmpl(value: memoryview, offset: int) -> TmplInfo:
    daddr, spi, proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos = _TMPL.unpack_from(
        value, offset
    )
    return TmplInfo(
        daddr, BE32.unpack(spi)[0], proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos
    )


def decode_acquire(payload: memoryview) -> AcquireInfo:
    """struct xfrm_user_acquire and every attribute build_acquire() puts
    after it (net/xfrm/xfrm_user.c): the policy's templates, security
    context, type, mark, if_id, offload device and the state's per-CPU id."""
    if len(payload) < XFRM_USER_ACQUIRE_LEN:
        raise DecodeError(f"acquire payload of {len(payload)} bytes, need {XFRM_USER_ACQUIRE_LEN}")
    daddr, spi, proto, saddr = _SA_HEAD.unpack_from(payload, ACQ_ID)
    sel = decode_selector(payload, ACQ_SEL)
    priority, index, pdir, action, pflags, share = _POLICY_TAIL.unpack_from(payload, ACQ_POLICY + POL_PRIORITY)
    policy = PolicyInfo(
        selector=decode_selector(payload, ACQ_POLICY),
        lifetime=_LIFETIME_CFG.unpack_from(payload, ACQ_POLICY + POL_LFT),
        priority=priority,
        index=index,
        dir=pdir,
        action=action,
        flags=pflags,
        share=share,
    )
    aalgos, ealgos, calgos = _ALGOS.unpack_from(payload, ACQ_ALGOS)
    (seq,) = U32.unpack_from(payload, ACQ_SEQ)
    templates: tuple[TmplInfo, ...] = ()
    mark = if_id = pcpu = ptype = ctx = offload = None
    for kind, value in iter_attrs(payload[XFRM_USER_ACQUIRE_LEN:]):
        if kind == XFRMA_TMPL and not templates:
            templates = tuple(
                decode_tmpl(value, o) for o in range(0, len(value) - XFRM_USER_TMPL_LEN + 1, XFRM_USER_TMPL_LEN)
            )
        elif kind == XFRMA_MARK and len(value) >= XFRM_MARK_LEN:
            mark = XFRM_MARK.unpack_from(value)
        elif kind == XFRMA_IF_ID and len(value) >= 4:
            if_id = U32.unpack_from(value)[0]
        elif kind == XFRMA_SA_PCPU and len(value) >= 4:
            pcpu = U32.unpack_from(value)[0]
        elif kind == XFRMA_POLICY_TYPE and len(value) >= 1:
            ptype = value[0]
        elif kind == XFRMA_SEC_CTX and len(value) >= 8:
            # struct xfrm_user_sec_ctx: len, exttype, alg, doi, ctx_len, then the context
            ctx_len = U16.unpack_from(value, 6)[0]
            ctx = bytes(value[8 : 8 + ctx_len])
        elif kind == XFRMA_OFFLOAD_DEV and len(value) >= _OFFLOAD.size:
            offload = _OFFLOAD.unpack_from(value)
    # The template the ACQ state was made for: the first one for the state's
    # protocol and destination (a bundle, AH+ESP say, lists every SA).  Its
    # family is the SA's (outer) one; the selector's may be the inner family
    # of a mixed-family tunnel.
    family, reqid, mode = sel.family, 0, None
    match = next((t for t in templates if t.proto == proto and t.daddr == daddr), None)
    match = match or next((t for t in templates if t.proto == proto), None) or (templates[0] if templates else None)
    if match is not None:
        family, reqid, mode = match.family, match.reqid, match.mode
    return AcquireInfo(
        daddr,
        BE32.unpack(spi)[0],
        proto,
        saddr,
        family,
        sel,
        reqid,
        mode,
        seq,
        policy=policy,
        aalgos=aalgos,
        ealgos=ealgos,
        calgos=calgos,
        templates=templates,
        mark=mark,
        if_id=if_id,
        pcpu=pcpu,
        policy_type=ptype,
        sec_ctx=ctx,
        offload=offload,
    )


def decode_delsa(payload: memoryview) -> SaInfo:
    """A DELSA as the kernel multicasts it: a usersa_id, then the whole
    state as an XFRMA_SA attribute, then the state's other attributes."""
    if len(payload) < XFRM_USERSA_ID_LEN:
        raise DecodeError(f"delsa payload of {len(payload)} bytes, need {XFRM_USERSA_ID_LEN}")
    info = b""
    rest = bytearray()
    for kind, value in iter_attrs(payload[XFRM_USERSA_ID_LEN:]):
        if kind == XFRMA_SA and not info:
            info = bytes(value)
        else:
            rest += attr(kind, bytes(value))
    if len(info) < XFRM_USERSA_INFO_LEN:
        raise DecodeError("delsa event without the state (XFRMA_SA)")
    return decode_sa(memoryview(info[:XFRM_USERSA_INFO_LEN] + bytes(rest)))


def delsa_tuple(payload: memoryview) -> tuple[int, bytes, int, int]:
    """(family, daddr, spi, proto) of a DELSA event, from its usersa_id
    alone: enough to see that a delete is none of ours, without decoding."""
    if len(payload) < XFRM_USERSA_ID_LEN:
        raise DecodeError(f"delsa payload of {len(payload)} bytes, need {XFRM_USERSA_ID_LEN}")
    daddr, spi, family, proto = _USERSA_ID.unpack_from(payload)
    return family, daddr, BE32.unpack(spi)[0], proto


def decode_flushsa(payload: memoryview) -> int:
    """The protocol a FLUSHSA emptied (0: every IPsec protocol)."""
    if len(payload) < 1:
        raise DecodeError("flushsa payload is empty")
    return payload[0]


def decode_expire(payload: memoryview) -> tuple[SaInfo, bool]:
    if len(payload) < XFRM_USER_EXPIRE_LEN:
        raise DecodeError(f"expire payload of {len(payload)} bytes, need {XFRM_USER_EXPIRE_LEN}")
    sa = decode_sa(memoryview(bytes(payload[:XFRM_USERSA_INFO_LEN]) + bytes(payload[XFRM_USER_EXPIRE_LEN:])))
    return sa, bool(payload[EXPIRE_HARD])

"""Capture real kernel replies as seed files for the fuzzers.

    unshare -n python3 fuzz/capture_corpus.py      # or just run it as root:
    python3 fuzz/capture_corpus.py                  # it re-runs itself under unshare -n

Everything happens in a fresh, empty network namespace, so the host's SAD is
never touched.  Writes one file per datagram exactly as recv() returned it:

  fuzz/corpus/feed/    replies on the request socket (what spialloc_batch_feed
                       and _pybatch._drain parse): NEWSA (v4/v6, mark, if_id,
                       dir, pcpu), ENOENT/EINVAL errors with ext-ack text,
                       capped and uncapped, DELSA acks and ESRCH, a GETSA dump
  fuzz/corpus/events/  multicast XFRM_MSG_ACQUIRE and XFRM_MSG_EXPIRE

The fuzz harness (csrc/fuzz_feed.c) takes the batch's seq0 and portid from the
first message of its input, so these files match "their" requests as captured.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spialloc import _wire as w  # noqa: E402

HERE = Path(__file__).resolve().parent
FEED = HERE / "corpus" / "feed"
EVENTS = HERE / "corpus" / "events"


def xfrm_socket(groups: int = 0, cap_ack: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_XFRM)
    s.setsockopt(w.SOL_NETLINK, w.NETLINK_EXT_ACK, 1)
    if cap_ack:
        s.setsockopt(w.SOL_NETLINK, w.NETLINK_CAP_ACK, 1)
    s.bind((0, groups))
    return s


def recv_all(s: socket.socket, timeout: float = 0.2) -> list[bytes]:
    out = []
    s.settimeout(timeout)
    while True:
        try:
            out.append(s.recv(1 << 16))
        except (TimeoutError, BlockingIOError):
            return out


def v4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text).ljust(16, b"\0")


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def allocspi(seq: int, *, family: int = w.AF_INET, daddr: bytes = v4("192.0.2.1"), saddr: bytes = bytes(16),
             proto: int = w.IPPROTO_ESP, mode: int = 0, reqid: int = 0, lo: int = 0xC0000000,
             hi: int = 0xCFFFFFFF, mark=None, if_id=None, direction=None, pcpu=None) -> bytes:
    info = w.userspi_info(family=family, daddr=daddr, saddr=saddr, proto=proto, mode=mode, reqid=reqid,
                          acq_seq=0, spi_min=lo, spi_max=hi)
    return w.allocspi(seq, info, w.sa_attrs(mark, if_id, direction, pcpu))


def save(directory: Path, name: str, data: bytes) -> None:
    (directory / name).write_bytes(data)
    print(f"{directory.name}/{name}: {len(data)} bytes")


def one(s: socket.socket, msg: bytes) -> bytes:
    s.send(msg)
    got = recv_all(s)
    assert len(got) == 1, f"expected one reply datagram, got {len(got)}"
    return got[0]


def spi_of(reply: bytes) -> int:
    return w.decode_alloc_reply(memoryview(reply)[w.NLMSGHDR_LEN:])


def capture() -> None:
    FEED.mkdir(parents=True, exist_ok=True)
    EVENTS.mkdir(parents=True, exist_ok=True)
    s = xfrm_socket()

    r = one(s, allocspi(100))
    save(FEED, "newsa_v4.bin", r)
    taken = spi_of(r)
    save(FEED, "newsa_v4_mark_ifid_dir.bin",
         one(s, allocspi(200, mode=1, reqid=7, saddr=v4("192.0.2.2"), mark=(5, 0xFF), if_id=9, direction=1)))
    save(FEED, "newsa_v6_all.bin",
         one(s, allocspi(300, family=w.AF_INET6, daddr=v6("2001:db8::1"), saddr=v6("2001:db8::2"),
                         mode=1, reqid=3, mark=(0x10, 0xFFFFFFFF), if_id=0xFFFFFFFF, direction=2, pcpu=0)))
    save(FEED, "newsa_comp.bin", one(s, allocspi(350, proto=w.IPPROTO_COMP, lo=0x100, hi=0xEFFF)))
    save(FEED, "newsa_ah_seq_wrap.bin", one(s, allocspi(0xFFFFFFFF, proto=w.IPPROTO_AH)))
    save(FEED, "err_enoent_extack.bin", one(s, allocspi(400, lo=taken, hi=taken)))
    save(FEED, "err_einval_min_gt_max.bin", one(s, allocspi(500, lo=0xC0000010, hi=0xC0000001)))
    save(FEED, "err_einval_ipcomp_extack.bin", one(s, allocspi(600, proto=w.IPPROTO_COMP, lo=0x100, hi=0x10000)))
    save(FEED, "err_einval_bad_proto.bin", one(s, allocspi(650, proto=47)))

    # Without NETLINK_CAP_ACK the kernel echoes the whole request before the TLVs.
    u = xfrm_socket(cap_ack=False)
    save(FEED, "err_enoent_uncapped_extack.bin", one(u, allocspi(700, lo=taken, hi=taken, mark=(1, 1), if_id=2)))
    save(FEED, "err_einval_uncapped.bin", one(u, allocspi(710, proto=w.IPPROTO_COMP, lo=0x100, hi=0x10000)))
    u.close()

    # One sendmsg with four requests, one bad: four reply datagrams, joined
    # into one file as a multi-message input.
    batch = b"".join(allocspi(800 + i, lo=(0xC0000020 if i == 2 else 0xC0000000),
                              hi=(0xC0000010 if i == 2 else 0xCFFFFFFF)) for i in range(4))
    s.send(batch)
    replies = recv_all(s)
    assert len(replies) == 4, len(replies)
    save(FEED, "multi_newsa_einval.bin", b"".join(replies))

    # DELSA: ack (error 0) then ESRCH, also as one multi-message input.
    sa_id = w.usersa_id(v4("192.0.2.1"), taken, w.AF_INET, w.IPPROTO_ESP)
    ack = one(s, w.delsa(900, sa_id, b""))
    esrch = one(s, w.delsa(901, sa_id, b""))
    save(FEED, "delsa_ack.bin", ack)
    save(FEED, "delsa_esrch.bin", esrch)
    save(FEED, "delsa_ack_esrch.bin", ack + esrch)

    # GETSA of one state, and a dump of the whole SAD (entries + NLMSG_DONE).
    rv6 = one(s, allocspi(950, family=w.AF_INET6, daddr=v6("2001:db8::9")))
    got = one(s, w.getsa(960, w.usersa_id(v6("2001:db8::9"), spi_of(rv6), w.AF_INET6, w.IPPROTO_ESP), b""))
    save(FEED, "getsa_v6.bin", got)
    s.send(w.getsa_dump(1000))
    dump = recv_all(s)
    save(FEED, "dump.bin", dump[0])
    if len(dump) > 1:
        save(FEED, "dump_done.bin", dump[-1])

    capture_events()
    s.close()


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def capture_events() -> None:
    """EXPIRE of a larval state (acq_expires=1) and a kernel ACQUIRE."""
    ev = xfrm_socket(groups=(1 << (w.XFRMNLGRP_ACQUIRE - 1)) | (1 << (w.XFRMNLGRP_EXPIRE - 1)))
    with open("/proc/sys/net/core/xfrm_acq_expires", "w") as f:
        f.write("1")
    s = xfrm_socket()
    one(s, allocspi(1, mark=(3, 0xF), if_id=4))
    deadline = time.monotonic() + 10
    expire = None
    while expire is None and time.monotonic() < deadline:
        for d in recv_all(ev, 0.5):
            if w.NLMSGHDR.unpack_from(d)[1] == w.XFRM_MSG_EXPIRE:
                expire = d
    assert expire is not None, "no EXPIRE"
    save(EVENTS, "expire_hard.bin", expire)
    with open("/proc/sys/net/core/xfrm_acq_expires", "w") as f:
        f.write("30")

    sh("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", "va")
    sh("ip", "link", "set", "va", "up")
    sh("ip", "link", "set", "vb", "up")
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "xfrm", "policy", "add", "src", "10.99.0.1/32", "dst", "10.99.0.2/32", "dir", "out",
       "tmpl", "src", "10.99.0.1", "dst", "10.99.0.2", "proto", "esp", "mode", "tunnel", "reqid", "7")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", ("10.99.0.2", 9))
    except OSError:
        pass
    acquire = None
    for d in recv_all(ev, 2.0):
        if w.NLMSGHDR.unpack_from(d)[1] == w.XFRM_MSG_ACQUIRE:
            acquire = d
            break
    assert acquire is not None, "no ACQUIRE"
    save(EVENTS, "acquire.bin", acquire)
    ev.close()
    s.close()


def capture_acquires() -> None:
    """ACQUIREs that carry what binding needs: a marked IPv4 tunnel policy,
    an IPv6 transport policy with a priority and an index of our own, and an
    AH+ESP bundle (two templates; the ACQUIRE is for the first SA missing)."""
    ev = xfrm_socket(groups=1 << (w.XFRMNLGRP_ACQUIRE - 1))
    sh("ip", "link", "add", "qa", "type", "veth", "peer", "name", "qb")
    sh("ip", "link", "set", "qa", "up")
    sh("ip", "link", "set", "qb", "up")
    sh("ip", "addr", "add", "10.98.0.1/24", "dev", "qa")
    sh("ip", "-6", "addr", "add", "fd00:98::1/64", "dev", "qa", "nodad")
    sh("ip", "xfrm", "policy", "add", "src", "10.98.0.1/32", "dst", "10.98.0.2/32", "dir", "out",
       "mark", "0x70", "mask", "0xf0",
       "tmpl", "src", "10.98.0.1", "dst", "10.98.0.2", "proto", "esp", "mode", "tunnel", "reqid", "7")
    sh("ip", "xfrm", "policy", "add", "src", "fd00:98::1/128", "dst", "fd00:98::2/128", "proto", "udp", "dir", "out",
       "priority", "100", "index", "0x4449", "tmpl", "proto", "esp", "mode", "transport", "reqid", "9")
    sh("ip", "xfrm", "policy", "add", "src", "10.98.0.1/32", "dst", "10.98.0.3/32", "dir", "out",
       "tmpl", "proto", "ah", "mode", "transport", "reqid", "11",
       "tmpl", "proto", "esp", "mode", "transport", "reqid", "12")
    for family, dst, mark, name in (
        (socket.AF_INET, "10.98.0.2", 0x75, "acquire_mark_tunnel.bin"),
        (socket.AF_INET6, "fd00:98::2", 0, "acquire_v6_transport.bin"),
        (socket.AF_INET, "10.98.0.3", 0, "acquire_bundle.bin"),
    ):
        u = socket.socket(family, socket.SOCK_DGRAM)
        if mark:
            u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        try:
            u.sendto(b"x", (dst, 9))
        except OSError:
            pass
        u.close()
        got = [d for d in recv_all(ev, 2.0) if w.NLMSGHDR.unpack_from(d)[1] == w.XFRM_MSG_ACQUIRE]
        assert got, f"no ACQUIRE for {dst}"
        save(EVENTS, name, got[0])
    ev.close()


if __name__ == "__main__":
    if os.environ.get("SPIALLOC_CAPTURE_INNER") != "1":
        env = dict(os.environ, SPIALLOC_CAPTURE_INNER="1")
        sys.exit(subprocess.run(["unshare", "-n", sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    if sys.argv[1:] == ["acquires"]:  # only these, leaving the other files as they are
        capture_acquires()
    else:
        capture()
        capture_acquires()

"""``spialloc`` command line: allocate, release and list SPIs.

    spialloc alloc --dst 192.0.2.1 --count 4 --json --isolated
    spialloc list --netns blue
    spialloc release --dst 192.0.2.1 --spi 0xc0001234 [--proto ah] [--mark 7/0xff] --netns blue

Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, NoReturn, Sequence

from . import __version__
from ._core import MAX_BATCH
from ._model import (
    INF,
    KernelState,
    Mode,
    Proto,
    Reservation,
    Reservations,
    check_int,
    default_range,
    joined_batches,
    parse_address,
    parse_mark,
    parse_proto,
    parse_range,
)
from ._netns import Namespace
from .allocator import Allocator
from .errors import InvalidRequest, NamespaceError, SpiallocError

USAGE = 2
FAILED = 1
INTERRUPTED = 130


class _Interrupted(Exception):
    """Ctrl-C in a command that cleaned up after itself; says what it did."""


#: The most SPIs one `alloc` run asks for: a million larval states already
#: take the kernel several hundred MB.  The library takes up to 2**32 - 1.
MAX_COUNT = 1_000_000
#: SPIs per allocate_many call in `alloc`: small enough to show progress and
#: to stop promptly on Ctrl-C, big enough to keep the C engine at full speed.
CHUNK = 10_000
#: Progress appears on a terminal once a run has taken this long (seconds).
PROGRESS_AFTER = 1.0

EPILOG = """exit status: 0 done; 1 the kernel or the system refused (no free SPI, no
privilege, out of file descriptors, --isolated impossible), or release deleted
fewer states than named (each one not deleted is named on stderr); 2 bad usage
(a malformed or out-of-range value, --count beyond the range or 1000000, a
--netns that names no network namespace); 130 interrupted (Ctrl-C): alloc
releases what it had allocated, unless --keep."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, without argparse's usage block: scripts log the last line
        # of stderr, and --help is there for people.
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal or 0x-hex)") from None


def _count(text: str) -> int:
    n = _int(text)
    if not 1 <= n <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of SPIs from 1 to {MAX_BATCH}")
    return n


def _seq(text: str) -> tuple[int, int]:
    """Both readings of a --seq: iproute2 prints a state's seq with
    "0x%08u" (decimal digits behind 0x), so "0x00000037" may mean 55 or 37."""
    value = _int(text)
    digits = text.strip()[2:]
    if text.strip()[:2].lower() == "0x" and len(digits) == 8 and digits.isdigit():
        return (value, int(digits))
    return (value, value)


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return (_int(value), _int(mask) if mask else 0xFFFFFFFF)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="spialloc",
        description="IPsec SPIs from the Linux kernel (XFRM ALLOCSPI).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def where(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--netns", metavar="NAME|PATH", help="network namespace (name from `ip netns`, or a path)")
        g.add_argument(
            "--isolated",
            action="store_true",
            help="work in a fresh throwaway namespace (as root, or a normal user via a user namespace); "
            "it and everything allocated in it vanish when the command exits",
        )
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    a = sub.add_parser("alloc", help="allocate SPIs (larval states; they expire after net.core.xfrm_acq_expires)")
    a.add_argument("--dst", required=True, help="destination address of the SA (IPv4 or IPv6)")
    a.add_argument("--src", help="source address (same family as --dst)")
    a.add_argument("--proto", default="esp", choices=["esp", "ah", "comp"])
    a.add_argument("--count", type=_count, default=1, help="how many SPIs (batched)")
    a.add_argument("--min", type=_int, dest="spi_min", help="lowest SPI (default depends on --proto)")
    a.add_argument("--max", type=_int, dest="spi_max", help="highest SPI")
    a.add_argument("--mode", default="transport", choices=["transport", "tunnel", "beet", "ro", "in_trigger"])
    a.add_argument("--reqid", type=_int, default=0)
    a.add_argument("--mark", type=_mark, help="VALUE[/MASK]")
    a.add_argument("--if-id", type=_int)
    a.add_argument("--dir", choices=["in", "out"], help="SA direction (XFRMA_SA_DIR, Linux 6.10+)")
    a.add_argument("--pcpu", type=_int, help="the CPU of a per-CPU SA (XFRMA_SA_PCPU, Linux 6.13+)")
    a.add_argument(
        "--seq",
        type=_seq,
        default=(0, 0),
        help="bind to the kernel ACQUIRE with this seq: decimal, or 0x-hex; `ip -s xfrm state` prints "
        "decimal digits after a 0x (seq 0x00000037 is 37): such a value is read the way that names an ACQ state",
    )
    a.add_argument("--allow-reserved", action="store_true", help="allow SPIs 1-255")
    a.add_argument(
        "--keep",
        action="store_true",
        help="on Ctrl-C, keep (and print) the SPIs allocated so far instead of releasing them",
    )
    where(a)

    r = sub.add_parser(
        "release",
        help="delete the states (larval or installed) with these SPIs (DELSA, `ip xfrm state delete`)",
        description="Delete the states named by --dst, each --spi, --proto and --mark, whatever they are "
        "(larval or installed SAs).  A state with a mark is only found with its --mark; with --if-id, a "
        "state whose if_id differs is left alone.  Exits 1 if fewer states were deleted than named.",
    )
    r.add_argument("--dst", required=True, help="destination address of the states")
    r.add_argument("--spi", type=_int, action="append", required=True, help="an SPI (repeat for several)")
    r.add_argument("--proto", default="esp", choices=["esp", "ah", "comp"], help="default: esp")
    r.add_argument("--mark", type=_mark, help="VALUE[/MASK] of the states (default: unmarked states)")
    r.add_argument("--if-id", type=_int, help="only delete states with this if_id")
    where(r)

    ls = sub.add_parser("list", help="list the states in the namespace, as `ip -s xfrm state` shows them")
    ls.add_argument("--larval", action="store_true", help="only larval states (allocated, not installed)")
    where(ls)
    return p


def _name(value: int) -> str | int:
    """An enum member as ip(8) names it ("esp", "tunnel"); a number that is none of ours as it is."""
    return value.name.lower() if isinstance(value, (Proto, Mode)) else int(value)


def _limit(n: int) -> int | None:
    return None if n == INF else n


def _state_dict(s: KernelState | Reservation) -> dict[str, object]:
    proto = _name(s.proto)
    out: dict[str, object] = {
        "spi": s.spi,
        "spi_hex": f"0x{s.spi:08x}",
        "dst": str(s.dst),
        "src": str(s.src),
        "proto": proto,
    }
    out["mode"] = _name(s.mode)
    out["reqid"] = s.reqid
    if isinstance(s, Reservation):  # what was asked for: only what was given
        if s.mark is not None:
            out["mark"] = list(s.mark)
        if s.if_id is not None:
            out["if_id"] = s.if_id
        if s.direction is not None:
            out["dir"] = s.direction.name.lower()
        if s.seq:
            out["seq"] = s.seq
        return out
    # A state as the kernel reports it: every field `ip -s xfrm state` shows
    # for a larval state, null where the state has none.
    out["mark"] = None if s.mark is None else list(s.mark)
    out["if_id"] = s.if_id
    out["dir"] = None if s.direction is None else s.direction.name.lower()
    out["seq"] = s.acquire_seq
    out["pcpu"] = s.pcpu
    out["larval"] = s.larval
    out["replay_window"] = s.replay_window
    sel = s.selector
    if sel is not None:
        out["selector"] = {
            "src": str(sel.src),
            "dst": str(sel.dst),
            "prefixlen_s": sel.prefixlen_s,
            "prefixlen_d": sel.prefixlen_d,
            "proto": sel.proto,
            "sport": sel.sport,
            "dport": sel.dport,
            "ifindex": sel.ifindex,
            "user": sel.user,
        }
    lft = s.lifetime
    out["lifetime"] = {  # null: no limit
        "soft_bytes": _limit(lft.soft_bytes),
        "hard_bytes": _limit(lft.hard_bytes),
        "soft_packets": _limit(lft.soft_packets),
        "hard_packets": _limit(lft.hard_packets),
        "soft_add_expires": lft.soft_add_expires,
        "hard_add_expires": lft.hard_add_expires,
        "soft_use_expires": lft.soft_use_expires,
        "hard_use_expires": lft.hard_use_expires,
    }
    out["added"] = s.added
    out["expires_at"] = s.added + lft.hard_add_expires if lft.hard_add_expires else None
    out["used"] = s.used or None
    out["bytes"] = s.byte_count
    out["packets"] = s.packet_count
    return out


def _line(s: Reservation) -> str:
    d = _state_dict(s)
    extra = "".join(f" {k} {d[k]}" for k in ("mode", "reqid", "mark", "if_id", "dir", "seq") if d.get(k))
    return f"{d['proto']} spi {d['spi_hex']} dst {d['dst']} src {d['src']}{extra}"


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _lim(n: int) -> str:
    return "(INF)" if n == INF else str(n)


def _lines(s: KernelState) -> list[str]:
    """A state in the words and order of `ip -s xfrm state`, compacted."""
    head = f"{_name(s.proto)} spi 0x{s.spi:08x} dst {s.dst} src {s.src} mode {_name(s.mode)} reqid {s.reqid}"
    out = [head + (" larval" if s.larval else "")]
    ids = []
    if s.mark is not None:
        ids.append(f"mark 0x{s.mark[0]:x}/0x{s.mark[1]:x}")
    if s.if_id is not None:
        ids.append(f"if_id {s.if_id:#x}")
    if s.direction is not None:
        ids.append(f"dir {s.direction.name.lower()}")
    if s.pcpu is not None:
        ids.append(f"pcpu {s.pcpu}")
    if s.acquire_seq:
        ids.append(f"seq {s.acquire_seq} (ip: 0x{s.acquire_seq:08d})")
    if ids:
        out.append("    " + " ".join(ids))
    if s.selector is not None:
        out.append(f"    sel {s.selector}")
    lft = s.lifetime
    out.append(
        f"    lifetime expire add: soft {lft.soft_add_expires}(sec), hard {lft.hard_add_expires}(sec); "
        f"expire use: soft {lft.soft_use_expires}(sec), hard {lft.hard_use_expires}(sec)"
    )
    if (lft.soft_bytes, lft.hard_bytes, lft.soft_packets, lft.hard_packets) != (INF, INF, INF, INF):
        out.append(
            f"    limit: soft {_lim(lft.soft_bytes)}(bytes), hard {_lim(lft.hard_bytes)}(bytes), "
            f"soft {_lim(lft.soft_packets)}(packets), hard {_lim(lft.hard_packets)}(packets)"
        )
    out.append(
        f"    current: {s.byte_count}(bytes), {s.packet_count}(packets) add {_when(s.added)} use {_when(s.used)}"
    )
    return out


def run(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "alloc":
        if args.seq[0] and args.count != 1:
            parser.error("--seq binds one SPI to one ACQUIRE; use --count 1")
        try:
            args.spi_range = _range(args)
        except InvalidRequest as exc:
            return _error(exc, USAGE)
        size = args.spi_range[1] - args.spi_range[0] + 1
        if args.count > size:
            lo, hi = args.spi_range
            parser.error(f"--count {args.count} is more than the {size} SPIs of the range {lo:#x}-{hi:#x}")
        if args.count > MAX_COUNT:
            parser.error(f"--count {args.count} is more than {MAX_COUNT} SPIs, the most one run allocates")
    try:
        ns = Namespace.isolated() if args.isolated else Namespace.open(args.netns)
    except NamespaceError as exc:
        # A --netns that names no network namespace is the caller's mistake;
        # --isolated failing (user namespaces disabled) is the system's.
        return _error(exc, FAILED if args.isolated else USAGE)
    except SpiallocError as exc:  # out of file descriptors
        return _error(exc, FAILED)
    try:
        # release deletes the states the user names, by (dst, spi, proto, mark):
        # no guard, so no reservation identity to check (each run is a new process).
        guard = args.command != "release"
        with Allocator(
            ns, guard=guard, watch_expiry=False, allow_reserved=getattr(args, "allow_reserved", False)
        ) as alloc:
            status = _command(args, alloc)
    except _Interrupted as exc:
        print(f"spialloc: interrupted: {exc}", file=sys.stderr)
        return INTERRUPTED
    except InvalidRequest as exc:
        return _error(exc, USAGE)
    except (SpiallocError, ImportError) as exc:  # ImportError: SPIALLOC_BACKEND=c, no extension
        return _error(exc, FAILED)
    finally:
        ns.close()
    return status


def _error(exc: BaseException, status: int) -> int:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    print(f"spialloc: error: {text}".replace("allow_reserved=True", "--allow-reserved"), file=sys.stderr)
    return status


def _command(args: argparse.Namespace, alloc: Allocator) -> int:
    if args.command == "alloc":
        opts = dict(
            src=args.src,
            spi_range=args.spi_range,
            mode=args.mode,
            reqid=args.reqid,
            mark=args.mark,
            if_id=args.if_id,
            direction=args.dir,
            pcpu=args.pcpu,
        )
        items: Sequence[Reservation]
        if args.count == 1:
            items = [alloc.allocate(args.dst, args.proto, seq=_resolve_seq(alloc, args.seq), **opts)]
        else:
            items = _alloc_many(args, alloc, opts)
        _print(args, items)
        return 0
    if args.command == "release":
        return _release(args, alloc)
    states = alloc.states(larval=True if args.larval else None)
    if args.json:
        print(json.dumps([_state_dict(s) for s in states]))
    else:
        for st in states:
            print("\n".join(_lines(st)))
    return 0


def _range(args: argparse.Namespace) -> tuple[int, int]:
    """The range `alloc` asks for, validated, before any syscall."""
    proto = parse_proto(args.proto)
    lo, hi = default_range(proto)
    lo = lo if args.spi_min is None else args.spi_min
    hi = hi if args.spi_max is None else args.spi_max
    return parse_range(proto, (lo, hi), args.allow_reserved)


def _print(args: argparse.Namespace, items: Sequence[Reservation]) -> None:
    if args.json:
        print(json.dumps([_state_dict(s) for s in items]))
    else:
        for r in items:
            print(_line(r))


class _Progress:
    """ "allocated N of M" on stderr, rewritten in place, once the run has
    taken PROGRESS_AFTER seconds, and only on a terminal without --json."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        if self.enabled and time.monotonic() - self.start >= PROGRESS_AFTER:
            sys.stderr.write(f"\rallocated {done} of {self.total}")
            sys.stderr.flush()
            self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _alloc_many(args: argparse.Namespace, alloc: Allocator, opts: dict[str, Any]) -> Sequence[Reservation]:
    """allocate_many in CHUNKs, all or nothing across them: a failed chunk
    releases the chunks before it; Ctrl-C releases them too, unless --keep
    (then they are printed).  What a run releases is what it still owns: a
    state of an early chunk may have expired or been deleted by someone else
    since, and its SPI may be another's by now (even a later chunk's)."""
    parts: list[Reservations] = []
    done = 0
    progress = _Progress(args.count, sys.stderr.isatty() and not args.json)
    try:
        # ``while True``, not ``while done < args.count``: CPython 3.13
        # compiles a conditional loop's back edge outside this try
        # (gh-130279), where a Ctrl-C would skip the release below.
        while True:
            if done >= args.count:
                break
            parts.append(alloc.allocate_many(min(CHUNK, args.count - done), args.dst, args.proto, **opts))
            done += len(parts[-1])
            progress.update(done)
    except KeyboardInterrupt:
        # The chunk in flight released its own states (allocate_many is all
        # or nothing under an interrupt, too); what came before is ours.
        progress.end()
        got = joined_batches(parts) if parts else None
        if args.keep:
            _print(args, got or [])
            raise _Interrupted(f"kept the {done} SPIs allocated so far (--keep)") from None
        released = 0 if got is None else alloc.core.release_owned(got)
        raise _Interrupted(f"released the {released} SPIs allocated so far") from None
    except BaseException:
        progress.end()
        if parts:
            alloc.core.release_owned(joined_batches(parts))
        raise
    progress.end()
    return joined_batches(parts) if parts else []


def _resolve_seq(alloc: Allocator, seq: tuple[int, int]) -> int:
    """The --seq value; for a value in ip's "0x%08u" form that reads as two
    numbers, the one that names an ACQ state in the namespace."""
    as_hex, as_ip = seq
    if as_hex == as_ip:
        return as_hex
    pending = {s.acquire_seq for s in alloc.states() if s.acquire_seq}
    named = [v for v in (as_hex, as_ip) if v in pending]
    if len(named) == 1:
        return named[0]
    found = "both name" if named else "neither names"
    raise InvalidRequest(
        f"--seq 0x{as_ip:08d} reads as {as_hex} (hex) or {as_ip} (how ip prints seqs) and {found} an ACQ state "
        "here: give the seq in decimal"
    )


def _release(args: argparse.Namespace, alloc: Allocator) -> int:
    dst = parse_address("dst", args.dst)
    proto = parse_proto(args.proto)
    mark = parse_mark(args.mark)
    if args.if_id is not None:
        check_int("--if-id", args.if_id)
    for spi in args.spi:
        check_int("--spi", spi)
    released, missed = 0, []
    sad: list[KernelState] | None = None  # dumped once, at the first miss
    for spi in args.spi:
        st = alloc.lookup(dst, spi, proto, mark=mark)
        why = None
        if st is None:
            sad = alloc.states() if sad is None else sad
            why = _why_missing(sad, dst, spi, proto, mark)
        elif args.if_id is not None and st.if_id != args.if_id:
            why = f"its if_id is {st.if_id}, not {args.if_id}"
        elif alloc.release(st.reservation()) == 0:
            why = "it was gone before the delete"
        if why is None:
            released += 1
        else:
            missed.append({"spi": spi, "spi_hex": f"0x{spi:08x}", "reason": why})
    if args.json:
        print(json.dumps({"released": released, "requested": len(args.spi), "not_released": missed}))
    else:
        print(f"released {released} of {len(args.spi)}")
    for m in missed:
        what = f"{proto.name.lower()} spi {m['spi_hex']} dst {dst}"
        print(f"spialloc: not released: {what}: {m['reason']}", file=sys.stderr)
    return FAILED if missed else 0


def _why_missing(sad: list[KernelState], dst: object, spi: int, proto: Proto, mark: tuple[int, int] | None) -> str:
    """Why GETSA found nothing: name what in the SAD would have found it."""
    near = [s for s in sad if s.spi == spi and s.dst == dst]
    if not near:
        return "no such state"
    hints = []
    for s in near:
        opts = []
        if s.proto != proto:
            opts.append(f"--proto {_name(s.proto)}")
        if s.mark != mark:
            opts.append("no --mark" if s.mark is None else f"--mark 0x{s.mark[0]:x}/0x{s.mark[1]:x}")
        hints.append(" ".join(opts))
    return f"no such state with these options (one exists with {'; '.join(h for h in hints if h)})"


def main() -> None:
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        print("spialloc: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

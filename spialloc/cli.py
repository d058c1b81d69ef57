"""``spialloc`` command line: allocate, release and list SPIs.

    spialloc alloc --dst 192.0.2.1 --count 4 --json --isolated
    spialloc list --netns blue
    spialloc release --dst 192.0.2.1 --spi 0xc0001234 --netns blue

Every error is one line on stderr, never a traceback.  Exit status 2: bad
usage (a malformed or out-of-range value, a --netns that names no network
namespace); 1: the kernel or the system refused (no free SPI, no privilege,
out of file descriptors, --isolated impossible).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn, Sequence

from ._core import MAX_BATCH
from ._model import KernelState, Reservation
from ._netns import Namespace
from .allocator import Allocator
from .errors import InvalidRequest, NamespaceError, SpiallocError

USAGE = 2
FAILED = 1


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


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return (_int(value), _int(mask) if mask else 0xFFFFFFFF)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spialloc", description="IPsec SPIs from the Linux kernel (XFRM ALLOCSPI).")
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
    a.add_argument("--dir", choices=["in", "out"], help="SA direction (XFRMA_SA_DIR)")
    a.add_argument("--seq", type=_int, default=0, help="bind to the kernel ACQUIRE with this seq")
    a.add_argument("--allow-reserved", action="store_true", help="allow SPIs 1-255")
    where(a)

    r = sub.add_parser("release", help="delete larval states")
    r.add_argument("--dst", required=True)
    r.add_argument("--spi", type=_int, action="append", required=True, help="repeat for several")
    r.add_argument("--proto", default="esp", choices=["esp", "ah", "comp"])
    r.add_argument("--mark", type=_mark)
    where(r)

    ls = sub.add_parser("list", help="list states in the namespace")
    ls.add_argument("--larval", action="store_true", help="only larval states (allocated, not installed)")
    where(ls)
    return p


def _state_dict(s: KernelState | Reservation) -> dict[str, object]:
    proto = s.proto.name.lower() if hasattr(s.proto, "name") else int(s.proto)
    out: dict[str, object] = {
        "spi": s.spi,
        "spi_hex": f"0x{s.spi:08x}",
        "dst": str(s.dst),
        "src": str(s.src),
        "proto": proto,
    }
    out["mode"] = s.mode.name.lower() if hasattr(s.mode, "name") else s.mode
    out["reqid"] = s.reqid
    if s.mark is not None:
        out["mark"] = list(s.mark)
    if s.if_id is not None:
        out["if_id"] = s.if_id
    if s.direction is not None:
        out["dir"] = s.direction.name.lower()
    if isinstance(s, KernelState):
        out["larval"] = s.larval
    return out


def _line(s: KernelState | Reservation) -> str:
    d = _state_dict(s)
    extra = "".join(f" {k} {d[k]}" for k in ("mode", "reqid", "mark", "if_id", "dir") if k in d and d[k] not in (0,))
    larval = " larval" if d.get("larval") else ""
    return f"{d['proto']} spi {d['spi_hex']} dst {d['dst']} src {d['src']}{extra}{larval}"


def run(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "alloc" and args.seq and args.count != 1:
        parser.error("--seq binds one SPI to one ACQUIRE; use --count 1")
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
            _command(args, alloc)
    except InvalidRequest as exc:
        return _error(exc, USAGE)
    except (SpiallocError, ImportError) as exc:  # ImportError: SPIALLOC_BACKEND=c, no extension
        return _error(exc, FAILED)
    finally:
        ns.close()
    return 0


def _error(exc: BaseException, status: int) -> int:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    print(f"spialloc: error: {text}".replace("allow_reserved=True", "--allow-reserved"), file=sys.stderr)
    return status


def _command(args: argparse.Namespace, alloc: Allocator) -> None:
    if args.command == "alloc":
        spi_range = None
        if args.spi_min is not None or args.spi_max is not None:
            from ._model import default_range, parse_proto

            lo, hi = default_range(parse_proto(args.proto))
            spi_range = (
                lo if args.spi_min is None else args.spi_min,
                hi if args.spi_max is None else args.spi_max,
            )
        opts = dict(
            src=args.src,
            spi_range=spi_range,
            mode=args.mode,
            reqid=args.reqid,
            mark=args.mark,
            if_id=args.if_id,
            direction=args.dir,
        )
        if args.count == 1:
            items = [alloc.allocate(args.dst, args.proto, seq=args.seq, **opts)]
        else:
            items = alloc.allocate_many(args.count, args.dst, args.proto, **opts)
        _print(args, items)
    elif args.command == "release":
        from ._model import Proto, parse_address, parse_proto

        dst = parse_address("dst", args.dst)
        proto: Proto = parse_proto(args.proto)
        res = [Reservation(spi=s, dst=dst, src=dst, proto=proto, mark=args.mark) for s in args.spi]
        n = alloc.release(res)
        if args.json:
            print(json.dumps({"released": n, "requested": len(res)}))
        else:
            print(f"released {n} of {len(res)}")
    else:
        _print(args, alloc.states(larval=True if args.larval else None))


def _print(args: argparse.Namespace, items: Sequence[KernelState | Reservation]) -> None:
    if args.json:
        print(json.dumps([_state_dict(s) for s in items], indent=None))
    else:
        for s in items:
            print(_line(s))


def main() -> None:
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        print("spialloc: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""spialloc: IPsec SPIs from the Linux kernel (XFRM_MSG_ALLOCSPI), without the traps.

>>> import spialloc
>>> with spialloc.Allocator() as alloc:            # needs CAP_NET_ADMIN
...     r = alloc.allocate("192.0.2.1", "esp")
...     print(hex(r.spi))
...     alloc.release(r)
"""

from __future__ import annotations

from ._model import (
    DEFAULT_CPI_RANGE,
    DEFAULT_SPI_RANGE,
    INF,
    Direction,
    KernelState,
    Lifetime,
    Mode,
    Proto,
    Reservation,
    Reservations,
    Selector,
)
from ._netns import Namespace
from .aio import AsyncAllocator
from .allocator import Allocator, AllocatorStats, BatchResult
from .errors import (
    AlreadyBound,
    BatchError,
    ClosedError,
    DecodeError,
    DuplicateSpi,
    ForkedError,
    InsufficientPrivilege,
    InvalidRequest,
    NamespaceError,
    NetlinkError,
    ReservationLost,
    ResourceError,
    SpiallocError,
    SpiExhausted,
    UnsupportedByKernel,
)
from .guard import Guard, GuardStats, State
from .ha import Partition, check_disjoint
from .monitor import Acquire, AcquirePolicy, Event, EventsLost, Expire, Monitor, Template


def _version() -> str:
    # One source of truth: pyproject.toml, through the installed metadata.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spialloc")
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "DEFAULT_CPI_RANGE",
    "DEFAULT_SPI_RANGE",
    "INF",
    "Acquire",
    "AcquirePolicy",
    "AlreadyBound",
    "Allocator",
    "AsyncAllocator",
    "AllocatorStats",
    "BatchError",
    "BatchResult",
    "ClosedError",
    "DecodeError",
    "Direction",
    "Event",
    "EventsLost",
    "Expire",
    "DuplicateSpi",
    "ForkedError",
    "Guard",
    "GuardStats",
    "InsufficientPrivilege",
    "InvalidRequest",
    "KernelState",
    "Lifetime",
    "Mode",
    "Monitor",
    "Namespace",
    "NamespaceError",
    "NetlinkError",
    "Partition",
    "Proto",
    "Reservation",
    "ReservationLost",
    "Reservations",
    "ResourceError",
    "Selector",
    "SpiExhausted",
    "SpiallocError",
    "State",
    "Template",
    "UnsupportedByKernel",
    "__version__",
    "backend",
    "check_disjoint",
]


def __getattr__(name: str) -> str:
    # Resolved on access, not at import: a bad SPIALLOC_BACKEND must be an
    # error where it is used, not a failed `import spialloc`.
    if name == "backend":
        from ._backend import select

        return select()[0]
    raise AttributeError(f"module 'spialloc' has no attribute {name!r}")

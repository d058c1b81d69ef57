"""The VM tier: tests that run INSIDE a guest booted by tests/vm/run.py
(``python -m tests.vm``), as root, on a Debian kernel that can install SAs.

On the host they are never collected: the runner sets SPIALLOC_VM_GUEST=1 in
the guest, and without it this folder's test files are ignored, so the
host's ``python -m pytest`` (testpaths = tests) neither runs nor skips them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

IN_GUEST = os.environ.get("SPIALLOC_VM_GUEST") == "1"
collect_ignore_glob = [] if IN_GUEST else ["test_*.py"]

# Which duplicate rule a kernel has: "old" compares (daddr, spi, proto), "new"
# (spi, proto) across destinations ("xfrm: Duplicate SPI Handling", 6.17, and
# its stable backports, CVE-2025-39797).  Per stable series, the first release
# known to have the new rule; None: no backport known.  Versions outside what
# was verified fail loudly instead of guessing (add them here once known).
NEW_RULES_FROM = {(6, 1): 191, (6, 12): 117}
VERIFIED_OLD = {(5, 10): 223, (6, 1): 176}


def kernel_version() -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", platform.release())
    assert m, platform.release()
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def full_version() -> tuple[int, int, int]:
    """The upstream version: Debian's 6.1 release string is 6.1.0-50-amd64;
    the real patch level is in /proc/version ("Debian 6.1.176-1")."""
    v = kernel_version()
    text = Path("/proc/version").read_text()  # also names the compiler: "gcc-12 (Debian 12.2.0-14)"
    for m in re.finditer(r"Debian (\d+)\.(\d+)\.(\d+)", text):
        if (int(m.group(1)), int(m.group(2))) == v[:2]:
            return int(m.group(1)), int(m.group(2)), int(m.group(3))
    return v


def duplicate_rules() -> str:
    v = full_version()
    if v[:2] >= (6, 17):
        return "new"
    series = v[:2]
    if series in NEW_RULES_FROM and v[2] >= NEW_RULES_FROM[series]:
        return "new"
    if series in VERIFIED_OLD and v[2] <= VERIFIED_OLD[series]:
        return "old"
    pytest.fail(
        f"kernel {'.'.join(map(str, v))}: which duplicate rule it has is not known; add it to tests/vm/conftest.py"
    )


# What each kernel series does with the attributes newer than some kernels,
# as this tier found it: XFRMA_SA_DIR (upstream 6.10) and XFRMA_SA_PCPU
# (upstream 6.13).  Debian's 6.12.117 keeps SA_PCPU although upstream added it
# in 6.13, so the series alone is no guide: every series the tier boots is
# listed, with the lowest patch level verified, and any other kernel fails
# loudly until someone records what it does.
#   series: (lowest verified patch level, SA_DIR kept, SA_PCPU kept)
FEATURES_SEEN = {
    (5, 10): (223, False, False),
    (6, 1): (176, False, False),
    (6, 12): (117, True, True),
    (7, 3): (4, True, True),
}
#: The Linux version spialloc's UnsupportedByKernel names for each attribute.
FEATURE_SINCE = {"direction": "6.10", "pcpu": "6.13"}


def expected_features() -> dict[str, bool]:
    """{"direction": kept?, "pcpu": kept?} for the booted kernel."""
    v = full_version()
    seen = FEATURES_SEEN.get(v[:2])
    if seen is None or v[2] < seen[0]:
        pytest.fail(
            f"kernel {'.'.join(map(str, v))}: whether it keeps SA_DIR and SA_PCPU is not known; "
            "add it to FEATURES_SEEN in tests/vm/conftest.py"
        )
    return {"direction": seen[1], "pcpu": seen[2]}


@pytest.fixture(scope="session")
def features() -> dict[str, bool]:
    return expected_features()


@pytest.fixture(scope="session")
def rules() -> str:
    r = duplicate_rules()
    expected = os.environ.get("SPIALLOC_VM_RULES")
    if expected:
        assert r == expected, f"the runner expects {expected} rules on this kernel, its version says {r}"
    return r


class Facts:
    """What the kernel did, for the report: printed, and merged into
    $SPIALLOC_VM_OUT/facts.json, which the runner prints per kernel."""

    def __init__(self) -> None:
        self.path = Path(os.environ.get("SPIALLOC_VM_OUT", "/tmp")) / "facts.json"

    def record(self, key: str, value: Any) -> None:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data.setdefault("kernel", platform.release())
        data.setdefault("version", ".".join(map(str, full_version())))
        data[key] = value
        self.path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"fact {key} = {value}")


@pytest.fixture(scope="session")
def facts() -> Iterator[Facts]:
    yield Facts()


@pytest.fixture
def name() -> Iterator[str]:
    """A named network namespace (`ip netns add`), deleted afterwards: for
    tests that drive it with ip(8) as well as with spialloc."""
    ns = f"spialloc-vm-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)

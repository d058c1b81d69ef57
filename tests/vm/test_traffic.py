"""End-to-end IPsec on spialloc's SPIs: each side's inbound SPI comes from
``Allocator.allocate()`` in its own namespace, the keys go onto that larval
state with UPDSA, ping passes, and the packet counters grow on exactly those
SPIs.  The setup is examples/keyd_traffic.py's (one implementation, used by
the example and here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name; keyd imports keyd_traffic
    spec.loader.exec_module(module)
    return module


keyd_traffic = load_example("keyd_traffic")
keyd = load_example("keyd")

VARIANTS = [
    ("esp", "transport", 4),
    ("esp", "tunnel", 4),
    ("esp", "transport", 6),
    ("esp", "tunnel", 6),
    ("ah", "transport", 4),
    ("ah", "tunnel", 6),
    ("comp", "transport", 4),
    ("comp", "tunnel", 6),
]


@pytest.mark.parametrize(("proto", "mode", "family"), VARIANTS, ids=[f"{p}-{m}-v{f}" for p, m, f in VARIANTS])
def test_traffic_on_allocated_spis(proto: str, mode: str, family: int, facts) -> None:  # type: ignore[no-untyped-def]
    with keyd_traffic.Link(proto, mode, family) as link:
        link.key()
        a, b = link.sides
        sent, received = link.ping(3)
        counters = link.counters()
        present = link.spis()
    facts.record(f"traffic.{proto}-{mode}-v{family}", {"ping": f"{received}/{sent}", "counters": counters})
    assert (sent, received) == (3, 3), f"ping {received}/{sent} over {proto} {mode} IPv{family}"
    for label, (packets, _) in counters.items():
        assert packets >= 3, f"{label}: {packets} packets on spialloc's SPI ({counters})"
    both = {a.reservation.spi, b.reservation.spi}
    assert present == {"a": both, "b": both}, f"states other than the allocated SPIs: {present}"
    if proto == "comp":
        assert all(spi <= 0xFFFF for spi in both), both


def test_example_script(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/keyd_traffic.py as a user runs it (its main(), in this process:
    a new Python process costs a minute or more under TCG): result=ok."""
    rc = keyd_traffic.main(["--count", "4"])
    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    assert rc == 0 and lines and lines[-1] == "result=ok", lines
    assert any(line.startswith("counters a.in packets=4 ") for line in lines), lines
    assert "only_allocated_spis=yes" in lines


def test_keyd_traffic(capsys: pytest.CaptureFixture[str], facts) -> None:  # type: ignore[no-untyped-def]
    """examples/keyd.py --traffic: the daemon's own SPIs (inbound, and the
    outbound one bound to the kernel's ACQUIRE) keyed and carrying ping."""
    rc = keyd.main(["--traffic", "--count", "4"])
    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    facts.record("keyd_traffic", [line for line in lines if line.startswith(("ping ", "counters ", "result="))])
    assert rc == 0 and lines and lines[-1] == "result=ok", lines
    assert any(line.startswith("counters a.in packets=4 ") for line in lines), lines
    assert "only_allocated_spis=yes" in lines
    assert any(line.startswith("repeat ") and "refused: already bound" in line for line in lines), lines

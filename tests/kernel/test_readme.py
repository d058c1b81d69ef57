"""README.md's code, run as written: the docs cannot drift from the library.

Every ```python block is a whole program; each runs in a fresh network
namespace of its own (a child of the test's namespace fixture, entered with
nsenter), with the checkout's spialloc on the path, and must exit 0 within a
minute.  The sample output of examples/keyd.py in the README must pass the
same checks as keyd's real output (test_example.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_example import check_keying_output

from spialloc import Namespace

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def fenced(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```LANG block, the indentation of a block
    inside a list item removed."""
    out = []
    for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```$", README, re.M | re.S):
        indent = len(m.group(1))
        code = "".join(line[indent:] + "\n" for line in m.group(2).splitlines())
        out.append((README.count("\n", 0, m.start()) + 1, code))
    return out


BLOCKS = fenced("python")


def test_the_readme_has_its_examples() -> None:
    assert len(BLOCKS) >= 5, "python blocks went missing from README.md"
    assert any("allocate_for(" in code for _, code in BLOCKS)


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_python_block_runs(netns: Namespace, line: int, code: str) -> None:
    assert netns.fd is not None, "needs a namespace fd to enter (run as root)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="error::ResourceWarning")
    proc = subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{netns.fd}", sys.executable, "-"],
        input=code,
        pass_fds=[netns.fd],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )
    assert proc.returncode == 0, f"README.md:{line}\n{proc.stdout}{proc.stderr}"
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.strip(), "every example prints what it did"
    if "allocate_for(" in code:
        bound = r"^acquire seq=\d+ mark=\(7, 4294967295\) policy index=\d+: spi 0xc[0-9a-f]{7}$"
        assert re.search(bound, proc.stdout, re.M), proc.stdout
        assert "is already bound in this process" in proc.stdout
    if "allocate_many(500" in code:
        assert proc.stdout.split() == ["10000", "256", "244"]


def test_keyd_sample_output_is_what_keyd_prints() -> None:
    (sample,) = [code for _, code in fenced("sh") if "examples/keyd.py --isolated" in code]
    out = "".join(line + "\n" for line in sample.splitlines() if not line.startswith("$ "))
    check_keying_output(out, mark="0x7/0xffffffff")
    lines = out.splitlines()
    assert lines[0] == "listening in isolated network namespace"
    assert lines[-2:] == ["released 2", "left 0"]

"""``python -m tests.vm``: the VM tier's runner (tests/vm/run.py)."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("run.py")), run_name="__main__")

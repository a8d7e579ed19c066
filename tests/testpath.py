"""Put the test folders on ``sys.path``: the tests follow the package's layers in folders, and some test
modules use others' fixtures and helpers (e.g. ``test_pipeline``'s tiny model). Subprocess scripts import this
after putting ``tests/`` on the path."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for _d in [TESTS, *sorted(p for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")) and
                          p.name != "scripts")]:
    if str(_d) not in sys.path:
        sys.path.append(str(_d))

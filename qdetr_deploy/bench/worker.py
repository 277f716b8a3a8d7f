"""One ``measure_engines`` call in its own process, for ``bench_engines(..., isolate=True)``.

Reads the keyword arguments as JSON on stdin and writes ``{"result": ..., "detections": {...}}`` as JSON
on stdout; a user error (:class:`QDetrError`) is one line on stderr and exit code 2.
Run as ``python -m qdetr_deploy.bench.worker``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from qdetr_deploy.bench.run import measure_engines
from qdetr_deploy.errors import QDetrError


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def main() -> int:
    kwargs = json.load(sys.stdin)
    try:
        result, detections = measure_engines(**kwargs)
    except QDetrError as e:
        print(str(e), file=sys.stderr)
        return 2
    json.dump({"result": result, "detections": detections}, sys.stdout, default=_plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())

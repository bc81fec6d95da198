"""Worker process of :mod:`_side_by_side`: build one workload, then time it on request.

``python _timing_worker.py MODULE:FUNCTION JSON_KWARGS``: calls
``MODULE.FUNCTION(**kwargs)`` (a factory returning a zero-argument callable),
runs it twice to warm up, prints ``{"package": <robustcompress/__init__.py it
imported>}`` and then, for each line ``N`` read from stdin, runs the callable
``N`` times and prints ``{"seconds": <elapsed>}``. One thread.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    module_name, function = sys.argv[1].split(":")
    fn = getattr(importlib.import_module(module_name), function)(**json.loads(sys.argv[2]))
    for _ in range(2):
        fn()
    import robustcompress

    print(json.dumps({"package": robustcompress.__file__}), flush=True)
    for line in sys.stdin:
        calls = int(line)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()

"""Time one workload under two revisions of the package in the same run, interleaved.

``bench_spectral.py --before REF`` and ``bench_overhead.py --before REF``
use this to show that a refactor left the speed alone: the package at git
revision ``REF`` (exported with ``git archive`` into a temporary folder) and
the working tree each run in their own worker process (single thread), and
the parent asks them for one timed block in turn, so slow phases of a shared
machine hit both sides alike. Each worker builds its workload from a
``module:function`` of ``benchmarks/`` (a factory returning a zero-argument
callable) with the package of its revision first on ``sys.path``, and says
which package file it imported, so a mix-up cannot pass silently.

Example (not run in tests: it needs git and minutes)::

    with Revisions("0b68a57") as revs:
        times = revs.interleave("bench_spectral:state_case", {"model": "mlp", "k": 1}, repeats=30)
    print(statistics.median(times["after"]) / statistics.median(times["before"]))
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_timing_worker.py"


def export_revision(ref: str, into: pathlib.Path) -> str:
    """Write the ``robustcompress`` package of git revision ``ref`` under ``into``; return the full commit id."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "robustcompress"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha


class Worker:
    """A process timing one workload built by ``factory`` with the package found under ``package_root``."""

    def __init__(self, package_root: pathlib.Path, factory: str, kwargs: dict) -> None:
        env = dict(os.environ, PYTHONPATH=str(package_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-u", str(WORKER), factory, json.dumps(kwargs)], cwd=HERE,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        self.package = ready["package"]
        expected = (package_root / "robustcompress" / "__init__.py").resolve()
        if pathlib.Path(self.package).resolve() != expected:
            self.close()
            raise RuntimeError(f"worker imported {self.package}, not {expected}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"timing worker exited with code {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def time(self, calls: int) -> float:
        """Seconds per call over ``calls`` back-to-back calls."""
        self.proc.stdin.write(f"{calls}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"] / calls

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


class Revisions:
    """The package at ``before`` (a git revision) and the working tree, as two package roots."""

    def __init__(self, before: str) -> None:
        self.before = before

    def __enter__(self) -> "Revisions":
        self._tmp = pathlib.Path(tempfile.mkdtemp(prefix="robustcompress-before-"))
        self.sha = export_revision(self.before, self._tmp)
        self.roots = {"before": self._tmp, "after": ROOT}
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def interleave(self, factory: str, kwargs: dict, repeats: int, calls: int = 1) -> dict[str, list[float]]:
        """``repeats`` timed blocks of ``calls`` calls per side, alternating before/after (order flipped each round)."""
        workers = {side: Worker(root, factory, kwargs) for side, root in self.roots.items()}
        times: dict[str, list[float]] = {side: [] for side in workers}
        try:
            for r in range(repeats):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for side in order:
                    times[side].append(workers[side].time(calls))
        finally:
            for w in workers.values():
                w.close()
        return times

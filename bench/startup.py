"""Benchmark: how long commands take to answer, beside a bare Python start, same run.

    python bench/startup.py [--runs 7]

Medians of N runs each, in fresh processes: `python -c pass` (the floor), `purlgate
--help` (goal under 0.15 s) and `purlgate process` of the 20-row demo file into a fresh
state folder (goal under 0.3 s). Prints seconds and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "fixtures" / "data" / "acme_spring_20261127_101500_00.csv"


def timed(args: list[str], cwd: Path, runs: int, fresh: Path | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        if fresh is not None:
            shutil.rmtree(fresh / "var", ignore_errors=True)
            shutil.rmtree(fresh / "out", ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(args, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("purlgate"))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shutil.copy(DEMO, tmp / DEMO.name)
        floor = statistics.median(timed([sys.executable, "-c", "pass"], tmp, args.runs))
        rows = [("python -c pass (floor)", floor, 0.0),
                ("purlgate --help", statistics.median(timed([exe, "--help"], tmp, args.runs)),
                 0.15),
                ("purlgate process (20 rows)", statistics.median(
                    timed([exe, "process", DEMO.name], tmp, args.runs, fresh=tmp)), 0.3)]
    print(f"median of {args.runs} runs, fresh processes:")
    for label, seconds, goal in rows:
        extra = f"   {seconds / floor:5.1f}x the floor" + (f"   goal < {goal} s" if goal else "")
        print(f"  {label:<28} {seconds:6.3f} s{extra}")


if __name__ == "__main__":
    main()

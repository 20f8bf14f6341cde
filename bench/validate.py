"""Benchmark: validate-only against processing, on the same file.

    python bench/validate.py [--rows 100000] [--runs 5]

A data file of ``--rows`` rows (as bench/core.py makes them, a few with errors) is
checked with ``purlgate validate`` (the whole command, start-up included: what a client's
script waits for) and, as the baseline, processed with ``purlgate process`` (PURL file,
row store, links). Prints the best of ``--runs`` of each and their ratio; the goal is an
answer in under 2 s for 100,000 rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_file(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("first_name,last_name,email,city\n")
        for i in range(rows):
            email = "" if i % 997 == 0 else f"user{i}@example.com"  # a few row errors
            f.write(f"Zoë{i},Müller{i % 313},{email},City {i % 50}\n")


def run(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("purlgate"))
    config = str(ROOT / "src" / "purlgate" / "regions.toml")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "acme_spring_20261127_101500_00.csv"
        make_file(data, args.rows)
        size = data.stat().st_size
        checked, processed = [], []
        for n in range(args.runs):
            checked.append(run([exe, "validate", str(data), "--config", config,
                                "--data-dir", "state", "--out", f"v{n}"], tmp))
            copy = tmp / f"acme_spring_20261127_1016{n:02d}_00.csv"  # a new name each run
            copy.write_bytes(data.read_bytes())
            processed.append(run([exe, "process", str(copy), "--config", config,
                                  "--data-dir", "state", "--out", f"p{n}"], tmp))
            os.remove(copy)
    print(f"machine: {os.cpu_count()} cores; a {args.rows:,}-row file ({size / 1e6:.1f} MB), "
          f"best of {args.runs}, whole commands (start-up included)")
    print(f"  purlgate validate   {min(checked):6.2f} s   (goal: under 2 s for 100,000 rows)")
    print(f"  purlgate process    {min(processed):6.2f} s   (baseline)")
    print(f"  ratio validate / process: {min(checked) / min(processed):.2f}")


if __name__ == "__main__":
    main()

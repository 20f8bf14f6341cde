"""Benchmark: the batch core against a bare pyarrow.csv pipeline, same file, same run.

    python bench/core.py                 # 1,000,000 rows
    python bench/core.py --rows 10000000 # memory must stay flat

Baseline: stream the file with pyarrow.csv, append two string columns, write it with
pyarrow.csv's writer. Core: `BatchProcessor.process` with the embedded renderer and a
real SQLite store (name rule, claim, sniffing, row checks, tokens, minimal quoting,
atomic publish, flag file, sha256). Each runs in its own child process so that each
peak RSS is its own. Prints rows/s, the ratio core/baseline and peak RSS, and the cost
of the row store (the core with it vs without it, same file, same run): keeping what the
bundled template reads (the default) and every column (its worst case), sealed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADER = ["prénom", "nom", "email", "montant", "date", "ville", "pays", "client_id",
          "remarque", "segment"]
FIRST = ["José", "Zoë", "Ångström", "Müller", "Łukasz", "Renée", "O'Brien", "Nguyễn",
         "Søren", "Émile"]
NAME = "acme_spring_20261127_101500_00.csv"
BODY_ROWS = 1_000_000  # larger files repeat this body


def generate(path: Path, rows: int) -> None:
    rnd = random.Random(1)
    body = path.with_suffix(".body")
    with body.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        for i in range(min(rows, BODY_ROWS)):
            fn = rnd.choice(FIRST)
            w.writerow([fn, rnd.choice(FIRST) + "son", f"user{i}@example.com",
                        f"{rnd.random() * 1000:.2f}", f"2026-{i % 12 + 1:02d}-{i % 28 + 1:02d}",
                        "São Paulo", "BR", str(100000 + i), f"aime {fn}, le thé, et le café",
                        rnd.choice(["or", "argent", "bronze"])])
    with path.open("wb") as out:
        out.write((",".join(HEADER) + "\n").encode())
        chunk = body.read_bytes()
        left = rows
        while left > 0:
            take = min(left, BODY_ROWS)
            if take == BODY_ROWS:
                out.write(chunk)
            else:
                out.write(b"".join(chunk.splitlines(keepends=True)[:take]))
            left -= take
    body.unlink()


def child_baseline(path: Path, out: Path) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    start = time.perf_counter()
    reader = pacsv.open_csv(
        str(path),
        read_options=pacsv.ReadOptions(block_size=1 << 20, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(HEADER, pa.string()), strings_can_be_null=False),
    )
    writer = None
    rows = 0
    for batch in reader:
        n = batch.num_rows
        ids = pc.cast(pa.array(range(rows, rows + n), pa.int64()), pa.string())
        thumb = pc.binary_join_element_wise("https://purl.example/t/", ids, ".jpg", "")
        page = pc.binary_join_element_wise("https://purl.example/p/", ids, "")
        table = pa.Table.from_batches([batch]).append_column("thumbnail_1", thumb)
        table = table.append_column("landingPage", page)
        if writer is None:
            writer = pacsv.CSVWriter(str(out), table.schema)
        writer.write_table(table)
        rows += n
    assert writer is not None
    writer.close()
    return {"seconds": time.perf_counter() - start, "rows": rows}


def child_core(path: Path, out: Path, *, rows: bool = True,
               every_column: bool = False) -> dict[str, float]:
    from purlgate.config import load_config
    from purlgate.core.pipeline import Submission
    from purlgate.region import build_region

    state = out / "state"
    region = build_region(load_config(None), "usa", data_dir=state)
    if not rows:
        region.processor.rows = None  # the core as it was before the web side
    if every_column:  # the row store's worst case: a template that reads every column
        region.rows.keep = lambda client, project, columns: list(columns)
    start = time.perf_counter()
    outcome = region.processor.process(
        Submission(path=path, received_name=NAME, channel="bench"), out
    )
    seconds = time.perf_counter() - start
    assert outcome.batch.state == "Done", outcome.batch.reason
    return {"seconds": seconds, "rows": outcome.batch.counts.rows_ok}


KINDS = ("baseline", "core-no-rows", "core", "core-all-cols")


def run_child(kind: str, path: Path, out: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), str(out)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="best of N for each side")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FILE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, file, out = args.child
        if kind == "baseline":
            result = child_baseline(Path(file), Path(out))
        else:
            result = child_core(Path(file), Path(out), rows=kind != "core-no-rows",
                                every_column=kind == "core-all-cols")
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        data = root / NAME
        t = time.perf_counter()
        generate(data, args.rows)
        size = data.stat().st_size
        print(f"data: {args.rows:,} rows, {size / 1e6:.0f} MB "
              f"(generated in {time.perf_counter() - t:.1f} s); best of {args.runs} runs")
        best: dict[str, dict[str, float]] = {}
        for i in range(args.runs):
            for kind in KINDS:
                out = root / f"{kind}-{i}"
                out.mkdir()
                r = run_child(kind, data, out / "out.csv" if kind == "baseline" else out)
                if kind not in best or r["seconds"] < best[kind]["seconds"]:
                    best[kind] = r
                for p in sorted(out.rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
        for kind in KINDS:
            r = best[kind]
            print(f"{kind:<14} {r['seconds']:6.2f} s  {r['rows'] / r['seconds']:>12,.0f} rows/s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB")
        ratio = best["core"]["seconds"] / best["baseline"]["seconds"]
        print(f"ratio core/baseline: {ratio:.2f} (target <= 1.5); "
              f"cpu: {os.cpu_count()} cores")
        for kind, what in (("core", "the columns the bundled template reads"),
                           ("core-all-cols", "every column")):
            cost = best[kind]["seconds"] / best["core-no-rows"]["seconds"] - 1
            print(f"row store cost, {what}, sealed: {cost:+.1%} (vs no row store; "
                  "target <= +10%)")


if __name__ == "__main__":
    main()

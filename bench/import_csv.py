"""Benchmark: `refinery import` of a generated orders CSV against a plain DuckDB load of the same file.

Each side runs in its own subprocess so peak RSS (ru_maxrss) is measured per side:
  baseline  CREATE TABLE AS SELECT * FROM read_csv(file)  (what DuckDB alone does)
  import    run_import() with a track mapping: payload SQL, dedup, cleaning, failed zone, chunks,
            the email as a token (HMAC in SQL), its value sealed per customer, the rows sealed per
            customer into the raw zone (50,000 customers: 50,000 data keys)
Usage: .venv/bin/python bench/import_csv.py [--rows 1000000] [--keep]
Targets: >= 500,000 rows/s and peak RSS < 1 GiB whatever the file size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAPPING = {
    "type": "track",
    "event": "Order Completed",
    "user_id": "customer_id",
    "email": "email",
    "timestamp": {"column": "ordered_at", "format": "%Y-%m-%d %H:%M:%S"},
    "properties": {
        "order_id": "order_id", "amount": {"column": "amount", "type": "double"}, "currency": "currency",
        "sku": "sku", "quantity": {"column": "quantity", "type": "integer"},
    },
    "row_key": ["order_id"],
}


def generate(path: Path, rows: int) -> None:
    import duckdb

    con = duckdb.connect()
    con.sql(
        "SELECT 'ord-' || i AS order_id, 'cust-' || (i % 50000) AS customer_id, "
        "'user' || (i % 50000) || '@example.com' AS email, "
        "strftime(TIMESTAMP '2024-01-01' + to_seconds(i), '%Y-%m-%d %H:%M:%S') AS ordered_at, "
        "round(random() * 500, 2) AS amount, (['EUR', 'USD', 'GBP'])[1 + i % 3] AS currency, "
        "'SKU-' || (i % 997) AS sku, i % 5 + 1 AS quantity FROM range(?) t(i)",
        params=[rows],
    ).write_csv(str(path), header=True)


def side(kind: str, csv_path: str, data_dir: str) -> None:
    """Run one side in this process and print its timing and peak RSS as JSON."""
    t0 = time.perf_counter()
    out: dict[str, object] = {"side": kind}
    if kind == "baseline":
        import duckdb

        con = duckdb.connect(str(Path(data_dir) / "baseline.duckdb"), config={"memory_limit": "2GB", "threads": 2})
        con.execute("CREATE TABLE orders AS SELECT * FROM read_csv(?)", [csv_path])
        out["rows"] = con.execute("SELECT count(*) FROM orders").fetchone()[0]  # type: ignore[index]
        con.close()
    else:
        from refinery.ingest.importer import run_import
        from refinery.runtime import Runtime
        from refinery.settings import Settings

        rt = Runtime.open(Settings(data_dir=Path(data_dir) / "refinery"))
        job = run_import(rt, csv_path, source="bench", mapping=MAPPING)
        rt.close()
        out.update(rows=job.rows_loaded, status=job.status, failed=job.rows_failed, error=job.error)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--side", choices=["baseline", "import"], help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side(args.side, args.csv, args.data_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "orders.csv"
        generate(csv_path, args.rows)
        size = csv_path.stat().st_size / 2**20
        print(f"{args.rows:,} rows, {size:.0f} MiB CSV")
        results = {}
        for kind in ("baseline", "import"):
            r = subprocess.run([sys.executable, __file__, "--side", kind, "--csv", str(csv_path), "--data-dir", tmp],
                               capture_output=True, text=True, check=True)
            results[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        for kind, r in results.items():
            print(f"{kind:9s} {r['seconds']:7.2f} s  {args.rows / r['seconds']:>10,.0f} rows/s  peak RSS {r['peak_rss_mib']:6.0f} MiB"
                  + (f"  loaded {r['rows']:,} ({r['status']})" if kind == "import" else ""))
        ratio = results["import"]["seconds"] / results["baseline"]["seconds"]
        rate = args.rows / results["import"]["seconds"]
        print(f"import / baseline time: {ratio:.2f}x")
        print(f"target 500,000 rows/s: {'met' if rate >= 500_000 else 'NOT met'} ({rate:,.0f}); "
              f"peak RSS < 1 GiB: {'met' if results['import']['peak_rss_mib'] < 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()

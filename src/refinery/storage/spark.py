"""The Spark engine: the batch jobs' SQL on Apache Spark, over the Parquet lake (storage/lake.py).

The engine's dialect is `refinery_spark`: sqlglot's Spark dialect plus the renderings of the
DuckDB functions the jobs use that Spark spells differently (each listed in `_FUNCTIONS` and in
docs/decisions/0031-spark-engine.md). Its capabilities say what Spark cannot do (no transactions,
no unique indexes, no UPDATE/DELETE of rows), so jobs never ask which engine they run on.

Tables: every table folder of the lake is a temporary view of the session (`<lake>/<table>/`,
read by Spark as one table). Statements the jobs use for their working tables are carried out by
the engine rather than by Spark's SQL, which has no temporary tables:

- `CREATE [OR REPLACE] TEMP TABLE t AS SELECT ...` computes the SELECT once (a local checkpoint,
  so iterative jobs do not grow ever longer plans) and names it `t`;
- `CREATE TEMP TABLE t (columns)` names an empty table; `INSERT INTO t SELECT ...` names the union;
- `DROP TABLE t` drops the name;
- `CREATE [OR REPLACE] TABLE t AS SELECT ...` (not temporary) writes the result to the lake as the
  table's only batch, `INSERT INTO t SELECT ...` of a lake table appends a batch file.

Spark is imported lazily (the `[spark]` extra); one SparkContext per process, one session per
engine (`newSession`: temporary views of one engine are not seen by another).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.dialects.spark import Spark
from sqlglot.generators.spark import SparkGenerator
from sqlglot.transforms import move_partitioned_by_to_schema_columns, preprocess, remove_unique_constraints

from refinery.errors import StorageError
from refinery.storage.engine import Capabilities, Engine, Params
from refinery.storage.lake import Lake, check_table_name, new_batch_id, swap_in

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from refinery.settings import Settings

log = logging.getLogger(__name__)

DIALECT = "refinery_spark"


# --- the dialect -----------------------------------------------------------------------------------
def _epoch_us(g: SparkGenerator, e: exp.Anonymous) -> str:
    return g.func("UNIX_MICROS", *e.expressions)


def _hash(g: SparkGenerator, e: exp.Anonymous) -> str:
    # DuckDB's hash() is 64 bits; Spark's HASH is 32 (millions of identifiers would collide).
    return g.func("XXHASH64", *e.expressions)


def _row(g: SparkGenerator, e: exp.Anonymous) -> str:
    # DuckDB's ROW(a, b) < ROW(c, d) compares field by field; Spark orders structs the same way.
    return g.func("STRUCT", *e.expressions)


#: DuckDB functions (parsed as anonymous calls) that Spark names or computes differently.
_FUNCTIONS: dict[str, Callable[[SparkGenerator, exp.Anonymous], str]] = {
    "epoch_us": _epoch_us,
    "hash": _hash,
    "row": _row,
    "ends_with": lambda g, e: g.func("ENDSWITH", *e.expressions),
    "json_extract_string": lambda g, e: g.func("GET_JSON_OBJECT", *e.expressions),
}


class RefinerySparkGenerator(SparkGenerator):
    TRANSFORMS = {
        **SparkGenerator.TRANSFORMS,
        # Keep CREATE TEMP TABLE ... AS (sqlglot turns it into a lazy view): the engine materialises it.
        exp.Create: preprocess([remove_unique_constraints, move_partitioned_by_to_schema_columns]),
    }

    def anonymous_sql(self, expression: exp.Anonymous) -> str:
        render = _FUNCTIONS.get(str(expression.this).lower())
        return render(self, expression) if render is not None else super().anonymous_sql(expression)

    def cte_sql(self, expression: exp.CTE) -> str:
        # Spark has no MATERIALIZED hint on a CTE; it decides on reuse itself.
        if expression.args.get("materialized") is not None:
            expression = expression.copy()
            expression.set("materialized", None)
        return super().cte_sql(expression)

    def tuple_sql(self, expression: exp.Tuple) -> str:
        # arg_min(x, (a, b)) orders by a tuple in DuckDB; Spark's min_by orders by a struct.
        if isinstance(expression.parent, exp.ArgMin | exp.ArgMax):
            return self.func("STRUCT", *expression.expressions)
        return super().tuple_sql(expression)

    def arrayagg_sql(self, expression: exp.ArrayAgg) -> str:
        # list(x ORDER BY k...): Spark's collect_list has no order; sort structs of (k..., x) instead.
        inner = expression.this
        if isinstance(inner, exp.Order):
            keys = []
            for i, o in enumerate(inner.expressions):
                if o.args.get("desc"):
                    raise StorageError("list(... ORDER BY ... DESC) has no Spark rendering here.",
                                       fix="Order ascending, or sort the list after aggregating it.")
                keys.append(exp.alias_(o.this.copy(), f"k{i}"))
            value = exp.alias_(inner.this.copy(), "v")
            struct = self.func("STRUCT", *keys, value)
            return f"TRANSFORM(ARRAY_SORT(COLLECT_LIST({struct})), _s -> _s.v)"
        return self.func("COLLECT_LIST", inner)


class RefinerySpark(Spark):
    """sqlglot's Spark dialect with Refinery's renderings of DuckDB functions."""

    Generator = RefinerySparkGenerator


# Registered under a readable name (sqlglot registers dialect classes by their lower-cased name).
sqlglot.Dialect.classes[DIALECT] = RefinerySpark


# --- the session ------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_ROOT: dict[str, Any] = {}


def spark_session(master: str = "local[2]", *, shuffle_partitions: int = 8,
                  conf: Mapping[str, str] | None = None) -> SparkSession:
    """The process's SparkSession (created once; Spark allows one SparkContext per process)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:  # pragma: no cover - the extra is installed in development
        raise StorageError("The Spark engine needs PySpark.", fix="pip install 'refinery[spark]' (and a Java 17+ runtime).") from e
    with _LOCK:
        session = _ROOT.get("session")
        if session is not None:
            return cast("SparkSession", session)
        settings = {
            "spark.ui.enabled": "false",
            "spark.sql.session.timeZone": "UTC",
            "spark.sql.ansi.enabled": "false",
            "spark.sql.shuffle.partitions": str(shuffle_partitions),
            "spark.sql.adaptive.enabled": "true",
            "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
            "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.ui.showConsoleProgress": "false",
            **(conf or {}),
        }
        builder = SparkSession.builder.master(master).appName("refinery")
        for k, v in settings.items():
            builder = builder.config(k, v)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        _ROOT["session"] = session
        return session


class _Result:
    """What `execute` returns: the rows of a query, collected when first asked for."""

    def __init__(self, df: DataFrame | None):
        self._df = df
        self._rows: list[tuple[Any, ...]] | None = None

    def _pending(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            # Through Arrow: instants come back aware, in UTC (collect() gives naive local times).
            table = None if self._df is None else _to_arrow(self._df)
            self._rows = [] if table is None else list(zip(*[c.to_pylist() for c in table.columns], strict=True))
        return self._rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self._pending()
        self._rows = []
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._pending()
        return rows.pop(0) if rows else None


class _Cursor:
    """Spark needs no cursors: the engine hands out this stand-in, which closes without effect."""

    def close(self) -> None:
        return None


class SparkEngine(Engine):
    """An engine over a SparkSession and a Parquet lake (see the module docstring)."""

    dialect = DIALECT
    capabilities = Capabilities(
        transactions=False,       # a job failing half-way leaves what it wrote; jobs are re-run whole
        unique_indexes=False,     # no keys: a job that needs uniqueness checks it in SQL
        json_merge_patch=False,   # no json_merge_patch(); JSON is text read by get_json_object
        arrow_scans=False,        # Arrow tables are copied into Spark (createDataFrame), not scanned in place
        extra={"updates": False, "temp_tables": "materialised views", "lake": True},
    )

    def __init__(self, lake: str | Path, *, master: str = "local[2]", shuffle_partitions: int = 8,
                 conf: Mapping[str, str] | None = None, session: SparkSession | None = None):
        self.lake_root = str(lake)
        self._local_lake = Lake.at(lake) if "://" not in self.lake_root else None
        root = session or spark_session(master, shuffle_partitions=shuffle_partitions, conf=conf)
        self.spark = root.newSession()  # temporary views of its own
        self._temp: set[str] = set()     # working tables this engine materialised
        self._lake_tables: set[str] = set()
        self.refresh()

    @classmethod
    def from_settings(cls, settings: Settings) -> SparkEngine:
        from refinery.storage.lake import lake_root

        return cls(lake_root(settings), master=settings.spark_master,
                   shuffle_partitions=settings.spark_shuffle_partitions, conf=settings.spark_conf)

    # --- the lake ---------------------------------------------------------------------------------
    def refresh(self, tables: Sequence[str] | None = None) -> list[str]:
        """(Re)register the lake's tables as views (after other processes wrote batches)."""
        if self._local_lake is not None:
            names = list(tables) if tables is not None else self._local_lake.tables()
        else:
            from refinery.storage.lake import DATA_TABLES

            names = list(tables) if tables is not None else list(DATA_TABLES)
        found = []
        for name in names:
            path = self._table_path(name)
            if self._local_lake is not None and not self._local_lake.files(name):
                continue
            try:
                df = self.spark.read.parquet(path)
            except Exception as e:  # noqa: BLE001 - a remote table that is not there
                if self._local_lake is not None:
                    raise StorageError(f"Spark cannot read the lake table {name!r} at {path}: {e}",
                                       fix="Check the files are Parquet (refinery lake export writes them).") from e
                continue
            df.createOrReplaceTempView(name)
            self._lake_tables.add(name)
            found.append(name)
        return found

    def _table_path(self, name: str) -> str:
        return self.lake_root.rstrip("/") + "/" + check_table_name(name)

    def write_table(self, name: str, df: DataFrame, *, mode: str = "overwrite") -> None:
        """Write `df` to the lake as table `name`: `overwrite` replaces the table by one batch,
        `append` adds a batch file; the view is registered again either way."""
        batch = new_batch_id()
        if self._local_lake is None:  # a cluster path: Spark's own files (part-*.parquet) in the folder
            df.write.mode(mode).parquet(self._table_path(name))
        else:
            folder = self._local_lake.table_dir(name)
            staging = Path(self.lake_root) / f".{name}.{uuid.uuid4().hex[:8]}"
            df.coalesce(1).write.mode("overwrite").parquet(str(staging))
            parts = sorted(staging.glob("part-*.parquet"))
            if mode == "append":
                folder.mkdir(parents=True, exist_ok=True)
                for i, part in enumerate(parts):
                    part.replace(folder / f"{batch}{'' if i == 0 else f'-{i}'}.parquet")
                shutil.rmtree(staging, ignore_errors=True)
            else:
                for p in staging.iterdir():
                    if p not in parts:
                        p.unlink()
                for i, part in enumerate(parts):
                    part.rename(staging / f"{batch}{'' if i == 0 else f'-{i}'}.parquet")
                swap_in(folder, staging)
        self.refresh([name])

    # --- hooks --------------------------------------------------------------------------------------
    def _execute(self, sql: str, params: Params, cursor: Any) -> Any:
        tree = _parse(sql)
        if isinstance(tree, exp.Create) and str(tree.args.get("kind", "")).upper() == "TABLE":
            return self._create_table(tree)
        if isinstance(tree, exp.Insert):
            return self._insert(tree, params)
        if isinstance(tree, exp.Drop) and str(tree.args.get("kind", "")).upper() in ("TABLE", "VIEW"):
            name = tree.this.name
            self.spark.catalog.dropTempView(name)
            self._temp.discard(name)
            return _Result(None)
        if isinstance(tree, exp.Update | exp.Delete | exp.Merge):
            raise StorageError("Spark has no UPDATE, DELETE or MERGE of the lake's rows (capability `updates` is false).",
                               fix="Compute the new table with a SELECT and replace the old one (CREATE OR REPLACE ... AS).",
                               sql=sql)
        return _Result(self._sql(sql, params))

    def _sql(self, sql: str, params: Params) -> DataFrame:
        if params is None:
            return self.spark.sql(sql)
        if isinstance(params, dict):
            return self.spark.sql(sql, args=dict(params))
        return self.spark.sql(sql, args=list(params))

    def _create_table(self, tree: exp.Create) -> _Result:
        target = tree.this.this if isinstance(tree.this, exp.Schema) else tree.this
        name = target.name
        temporary = bool(tree.args.get("properties") and tree.args["properties"].find(exp.TemporaryProperty))
        query = tree.expression
        exists = name in self._temp or name in self._lake_tables
        if exists and not tree.args.get("replace") and not tree.args.get("exists"):
            raise StorageError(f"Table {name!r} exists.", fix="CREATE OR REPLACE it, or drop it first.")
        if exists and tree.args.get("exists"):
            return _Result(None)
        if isinstance(query, exp.Query):
            df = self.spark.sql(query.sql(dialect=DIALECT))
        else:
            schema = cast(exp.Schema, tree.this)
            ddl = ", ".join(c.sql(dialect=DIALECT) for c in schema.expressions if isinstance(c, exp.ColumnDef))
            df = self.spark.createDataFrame([], ddl)
        if temporary:
            self._name(name, df)
        else:
            self.write_table(name, df, mode="overwrite")
        return _Result(None)

    def _name(self, name: str, df: DataFrame) -> None:
        """Materialise `df` (cut from its lineage) and name it as a temporary table."""
        df.localCheckpoint(eager=True).createOrReplaceTempView(name)
        self._temp.add(name)

    def _insert(self, tree: exp.Insert, params: Params) -> _Result:
        target = tree.this.this if isinstance(tree.this, exp.Schema) else tree.this
        name = target.name
        query = tree.expression
        if not isinstance(query, exp.Query):
            raise StorageError("The Spark engine inserts rows from a SELECT only.",
                               fix="Register the rows (engine.register) and INSERT ... SELECT from them.")
        new = self._sql(query.sql(dialect=DIALECT), params)
        if name in self._lake_tables and name not in self._temp:
            old_schema = self.spark.table(name).schema
            self.write_table(name, _conform(new, old_schema), mode="append")
            return _Result(None)
        if name not in self._temp:
            raise StorageError(f"There is no table {name!r} to insert into.", fix="Create it first.")
        old = self.spark.table(name)
        self._name(name, old.union(_conform(new, old.schema)))
        return _Result(None)

    def _fetch_arrow(self, sql: str, params: Params, cursor: Any) -> pa.Table:
        tree = _parse(sql)
        if not isinstance(tree, exp.Query):
            self._execute(sql, params, cursor)
            return pa.table({})
        return _to_arrow(self._sql(sql, params))

    def _stream_arrow(self, sql: str, params: Params, batch_size: int, cursor: Any) -> pa.RecordBatchReader:
        table = self._fetch_arrow(sql, params, cursor)
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(batch_size))

    def register(self, name: str, table: pa.Table, *, cursor: Any = None) -> None:
        df = self.spark.createDataFrame(_spark_ready(table))
        df.createOrReplaceTempView(name)

    def unregister(self, name: str, *, cursor: Any = None) -> None:
        self.spark.catalog.dropTempView(name)

    def reader(self) -> Any:
        return _Cursor()

    def fresh_reader(self) -> Any:
        return _Cursor()

    def interrupt(self, cursor: Any) -> None:
        self.spark.sparkContext.cancelAllJobs()

    @contextmanager
    def transaction(self, cursor: Any = None) -> Iterator[Any]:
        """No transactions (capability `transactions` is false): the block runs as it is."""
        yield _Cursor()

    def after_commit(self, callback: Callable[[], None]) -> None:
        callback()

    def close(self) -> None:
        for name in list(self._temp | self._lake_tables):
            self.spark.catalog.dropTempView(name)
        self._temp.clear()
        self._lake_tables.clear()


def _parse(sql: str) -> exp.Expression:
    try:
        return cast(exp.Expression, sqlglot.parse_one(sql, read=DIALECT))
    except sqlglot.errors.ParseError:
        return exp.Command(this=sql)  # let Spark say what it makes of it


def _conform(new: DataFrame, schema: Any) -> DataFrame:
    """`new`'s columns, by position, named and typed as `schema`'s (INSERT is positional)."""
    from pyspark.sql.functions import col

    if len(new.columns) != len(schema.fields):
        raise StorageError(f"INSERT gives {len(new.columns)} column(s) for a table of {len(schema.fields)}.",
                           fix="Select the table's columns, in order.")
    return new.select(*[col(f"`{c}`").cast(f.dataType).alias(f.name) for c, f in zip(new.columns, schema.fields, strict=True)])


def _spark_ready(table: pa.Table) -> pa.Table:
    """Arrow columns Spark cannot take (the null type) as strings of nulls."""
    cols = []
    for field in table.schema:
        column = table.column(field.name)
        cols.append(column.cast(pa.string()) if pa.types.is_null(field.type) else column)
    return pa.table(cols, names=table.column_names)


def _to_arrow(df: DataFrame) -> pa.Table:
    table = df.toArrow()
    # Spark's TIMESTAMP is an instant; say so in UTC, as DuckDB's TIMESTAMPTZ does.
    fields = []
    for f in table.schema:
        if pa.types.is_timestamp(f.type) and f.type.tz is not None and f.type.tz != "UTC":
            fields.append(pa.field(f.name, pa.timestamp(f.type.unit, tz="UTC")))
        else:
            fields.append(f)
    schema = pa.schema(fields)
    return table if schema == table.schema else table.cast(schema)

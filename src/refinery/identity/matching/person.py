"""Person-record matching: a Fellegi-Sunter model (Splink on DuckDB), trained by EM, scored pairwise.

The pipeline, for one table of person records:

1. check and normalise the records on a scratch in-memory DuckDB (`records.stage`);
2. compare only the fields that hold values, each with levels from exact to "anything else"
   (`COMPARISONS`), and score only pairs that share something (`BLOCKING`);
3. set the prior (how likely two random records match) from pairs that agree on strong keys,
   estimate u by random sampling (seeded) and m by expectation maximisation over a few
   training blocks (`TRAINING`);
4. keep pairs whose match probability reaches the threshold, as `identity_links` rows whose
   evidence lists, per field, the level the pair reached and the match weight it added.

The model version is a hash of everything that decides the scores: the comparisons, blocking
and training rules, the seed and sample size, Splink's version and a digest of the records.
The same records and settings therefore give the same version, the same link ids and the same
scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from refinery.identity.matching import _splink, records
from refinery.identity.matching.errors import MatchingError
from refinery.identity.matching.links import PERSON_RECORD, build_links, empty_links, fingerprint
from refinery.storage.duckdb_engine import DuckDBEngine
from refinery.storage.engine import Engine, parse

if TYPE_CHECKING:
    from refinery.settings import Settings

# Bump when the pipeline changes in a way the settings below do not capture: it is part of the version.
PIPELINE_VERSION = 3

# Field -> kind of comparison. The kinds are built in `_comparison`; their levels are listed in
# docs/identity-matching.md and argued for in docs/decisions/0007-probabilistic-matching.md.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("first_name", "name"),
    ("last_name", "name"),
    ("dob", "date"),
    ("address", "street"),
    ("city", "place"),
    ("postcode", "code"),
    ("country", "exact"),
    ("email", "email"),
    ("phone", "phone"),
)

# Pairs are scored when they agree exactly on any of these field sets (a union, deduplicated).
BLOCKING: tuple[tuple[str, ...], ...] = (
    ("first_name", "substr(last_name, 1, 1)"),  # one name exact, the other's initial: a typo in
    ("last_name", "substr(first_name, 1, 1)"),  # either name still meets its pair
    ("dob",),
    ("postcode", "substr(first_name, 1, 1)"),  # the initials survive most typos; the full
    ("postcode", "substr(last_name, 1, 1)"),  # names need not
    ("city", "last_name"),
    ("address",),
    ("email",),
    ("phone",),
)

# EM runs once per block; each block trains the m values of every field it does not block on.
TRAINING: tuple[tuple[str, ...], ...] = (
    ("first_name", "last_name"),
    ("dob",),
    ("postcode",),
    ("email",),
)

# Household guard: contact fields (email, phone, address) are shared within a household, and
# Fellegi-Sunter adds their weights as if they were independent, so two members of one family
# outscore any threshold. A pair whose first names clearly differ (below every similarity level)
# and whose dates of birth are more than a year apart (and not one typo apart) describes two
# people, whatever else they share: it is never linked, and counted as `guarded`.
# field -> highest comparison vector value that counts as a contradiction (0 is "anything else").
GUARD: dict[str, int] = {"first_name": 0, "dob": 1}

# Pairs agreeing on one of these are near-certain matches; their count sets the prior.
PRIOR_RULES: tuple[tuple[str, ...], ...] = (
    ("first_name", "last_name", "dob"),
    ("email",),
    ("phone",),
)


@dataclass(frozen=True)
class PersonMatchConfig:
    """The knobs of person-record matching; all but `threshold` and `threads` are part of the model version."""

    threshold: float = 0.99  # links below this match probability are not kept
    seed: int = 42  # the u sample
    u_max_pairs: int = 2_000_000  # pairs sampled to estimate u
    prior_recall: float = 0.7  # share of true matches PRIOR_RULES are assumed to find
    threads: int = 2
    memory_limit: str = "1GB"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise MatchingError(
                f"The person-record threshold must be in (0, 1]; got {self.threshold}.",
                field="matching_person_threshold",
                fix="Use a match probability such as 0.9.",
            )
        if not 0.0 < self.prior_recall <= 1.0:
            raise MatchingError(f"prior_recall must be in (0, 1]; got {self.prior_recall}.", fix="Use e.g. 0.7.")

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonMatchConfig:
        return cls(
            threshold=settings.matching_person_threshold,
            seed=settings.matching_seed,
            u_max_pairs=settings.matching_u_max_pairs,
            threads=settings.duckdb_threads,
        )

    def model_parts(self) -> dict[str, Any]:
        parts = asdict(self)
        for k in ("threshold", "threads", "memory_limit"):
            parts.pop(k)
        return parts


@dataclass
class PersonMatchResult:
    links: pa.Table  # identity_links rows, score >= threshold
    model_version: str
    records: int
    fields: tuple[str, ...]  # fields compared (the ones holding values)
    pairs_scored: int = 0  # pairs the blocking rules let through and the model scored
    prior: float = 0.0
    trained: list[str] = field(default_factory=list)  # EM blocks that ran
    skipped: list[str] = field(default_factory=list)  # EM blocks that could not run, with why
    guarded: int = 0  # pairs above the threshold dropped by the household guard (GUARD)

    def summary(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "records": self.records,
            "fields": list(self.fields),
            "pairs_scored": self.pairs_scored,
            "links": self.links.num_rows,
            "prior": self.prior,
            "trained": self.trained,
            "skipped": self.skipped,
            "guarded": self.guarded,
        }


def model_version(config: PersonMatchConfig, fields: tuple[str, ...], digest: str) -> str:
    """'pr-' + a hash of the model's settings and its training data's digest."""
    spec = {
        "pipeline": PIPELINE_VERSION,
        "splink": _splink.version(),
        # Every comparison level's SQL and every blocking rule, as Splink will run them: a changed
        # level or rule is a new version without anyone having to remember to bump one.
        "model": _settings(fields, prior=0.0).create_settings_dict("duckdb"),
        "guard": GUARD,
        "training": _usable(TRAINING, fields),
        "prior_rules": _usable(PRIOR_RULES, fields),
        "config": config.model_parts(),
        "data": digest,
    }
    return "pr-" + fingerprint(spec)


def match_person_records(
    person_records: Any, config: PersonMatchConfig | None = None, *, now: datetime | None = None
) -> PersonMatchResult:
    """Train a model on `person_records` and return the links it scores at or above the threshold.

    `person_records`: an Arrow table or DuckDB relation with the columns of `records.COLUMNS`.
    Runs on a scratch in-memory DuckDB; the store is not touched (write the links with
    `store.write_links`).
    """
    config = config or PersonMatchConfig()
    _splink.require()
    created_at = now or datetime.now(UTC)
    scratch = DuckDBEngine(":memory:", memory_limit=config.memory_limit, threads=config.threads)
    try:
        n, digest, fields = records.stage(scratch, person_records)
        version = model_version(config, fields, digest)
        result = PersonMatchResult(empty_links(), version, n, fields)
        if n < 2 or not _usable(BLOCKING, fields):
            return result
        with _splink.quiet():
            _run(scratch, config, result, created_at)
        return result
    finally:
        scratch.close()


# --- the model -------------------------------------------------------------------------------


def _usable(rules: tuple[tuple[str, ...], ...], fields: tuple[str, ...]) -> list[list[str]]:
    """The rules whose every term (a field, or an expression over one: `substr(last_name, 1, 1)`) has data."""
    return [list(r) for r in rules if all(_field_of(term) in fields for term in r)]


def _field_of(term: str) -> str:
    return next((f for f in records.FIELDS if term == f or f"({f}," in term), term)


def _comparison(column: str, kind: str) -> Any:
    cl = _splink.require("splink.comparison_library")
    cll = _splink.require("splink.comparison_level_library")
    if kind == "date":
        return cl.DateOfBirthComparison(column, input_is_string=True, datetime_format="%Y-%m-%d")
    levels: dict[str, Callable[[], list[Any]]] = {
        "name": lambda: [
            cll.ExactMatchLevel(column),
            cll.DamerauLevenshteinLevel(column, 1),
            cll.JaroWinklerLevel(column, 0.9),
            cll.JaroWinklerLevel(column, 0.8),
        ],
        "street": lambda: [
            cll.ExactMatchLevel(column),
            cll.JaroWinklerLevel(column, 0.9),
            cll.JaroWinklerLevel(column, 0.8),
        ],
        # Not Splink's EmailComparison: its user-name and Jaro-Winkler levels reward
        # `ann.lee@a.example` vs `annlee@b.example`, which mostly repeats the name agreement
        # (user names are made of names) and joins namesakes. Near misses count only as typos:
        # the same user name with the domain one edit away (`gmial.com`, `example.nte`), or the
        # same domain with the user name one edit away in its letters. A difference in
        # separators alone (`liam.nguyen@` vs `liam_nguyen@`) is as often two people as one.
        "email": lambda: [
            cll.ExactMatchLevel(column, term_frequency_adjustments=True),
            cll.CustomLevel(
                f"split_part(\"{column}_l\", '@', 1) = split_part(\"{column}_r\", '@', 1) AND "
                f"damerau_levenshtein(split_part(\"{column}_l\", '@', 2), split_part(\"{column}_r\", '@', 2)) <= 1",
                label_for_charts=f"Same user name, {column} domain one typo apart",
            ),
            cll.CustomLevel(
                f"split_part(\"{column}_l\", '@', 2) = split_part(\"{column}_r\", '@', 2) AND "
                f"damerau_levenshtein(split_part(\"{column}_l\", '@', 1), split_part(\"{column}_r\", '@', 1)) <= 1 AND "
                f"regexp_replace(split_part(\"{column}_l\", '@', 1), '[._+-]', '', 'g') <> "
                f"regexp_replace(split_part(\"{column}_r\", '@', 1), '[._+-]', '', 'g')",
                label_for_charts=f"Same domain, {column} user name one typo apart",
            ),
        ],
        "place": lambda: [cll.ExactMatchLevel(column), cll.JaroWinklerLevel(column, 0.9)],
        "exact": lambda: [cll.ExactMatchLevel(column)],
        "code": lambda: [cll.ExactMatchLevel(column), cll.DamerauLevenshteinLevel(column, 1)],
        "phone": lambda: [
            cll.ExactMatchLevel(column),
            cll.CustomLevel(
                f'right("{column}_l", 9) = right("{column}_r", 9)', label_for_charts=f"Last 9 digits of {column} match"
            ),
            cll.DamerauLevenshteinLevel(column, 1),
        ],
    }
    if kind not in levels:
        raise MatchingError(f"Unknown comparison kind {kind!r} for {column}.", fix=f"Use one of {sorted(levels)}.")
    return cl.CustomComparison(
        comparison_levels=[cll.NullLevel(column), *levels[kind](), cll.ElseLevel()], output_column_name=column
    )


def _settings(fields: tuple[str, ...], *, prior: float) -> Any:
    splink = _splink.require()
    return splink.SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="record_id",
        comparisons=[_comparison(c, kind) for c, kind in COMPARISONS if c in fields],
        blocking_rules_to_generate_predictions=[splink.block_on(*r) for r in _usable(BLOCKING, fields)],
        probability_two_random_records_match=prior,
        retain_matching_columns=True,  # keeps the gamma (level) columns the evidence is read from
        retain_intermediate_calculation_columns=True,  # keeps the match weight of each field
        linker_uid="refinery",
    )


def _prior(engine: Engine, fields: tuple[str, ...], n: int, recall: float) -> float:
    """Pairs agreeing on a PRIOR_RULE, scaled up by the rules' assumed recall, over all pairs."""
    total = n * (n - 1) / 2
    selects = []
    for rule in _usable(PRIOR_RULES, fields):
        on = exp.and_(*(exp.column(f, "l").eq(exp.column(f, "r")) for f in rule))
        selects.append(
            exp.select(exp.column("record_id", "l").as_("a"), exp.column("record_id", "r").as_("b"))
            .from_(exp.to_table("person_records").as_("l"))
            .join(exp.to_table("person_records").as_("r"), on=exp.and_(on, exp.column("record_id", "l") < exp.column("record_id", "r")))
        )
    found = 0
    if selects:
        union = selects[0]
        for s in selects[1:]:
            union = exp.union(union, s, distinct=True)  # type: ignore[assignment]
        found = int(engine.fetch_all(exp.select("count(*)").from_(union.subquery("pairs")))[0][0])
    # At least one expected match, at most one pair in two: keeps the prior finite and honest on tiny inputs.
    return min(max(found / recall, 1.0) / total, 0.5)


def _run(scratch: DuckDBEngine, config: PersonMatchConfig, result: PersonMatchResult, created_at: datetime) -> None:
    splink = _splink.require()
    exceptions = _splink.require("splink.internals.exceptions")
    duckdb_api = _splink.require("splink.backends.duckdb")
    fields = result.fields
    result.prior = _prior(scratch, fields, result.records, config.prior_recall)
    settings = _settings(fields, prior=result.prior)
    db = duckdb_api.DuckDBAPI(scratch.connection)
    linker = splink.Linker(db.register("person_records"), settings, log_level=None)
    linker.training.estimate_u_using_random_sampling(max_pairs=config.u_max_pairs, seed=config.seed)
    for i, rule in enumerate(_usable(TRAINING, fields)):
        name = "+".join(rule)
        before = linker.misc.save_model_to_json()
        try:
            linker.training.estimate_parameters_using_expectation_maximisation(splink.block_on(*rule))
            result.trained.append(name)
        except (exceptions.SplinkException, ValueError, ZeroDivisionError) as e:
            # Too few or too uniform pairs in this block (an m value underflows, no pairs at all).
            # A failed session leaves the linker half-updated (Splink drops the blocked comparison
            # from the model it was training), so the model is rebuilt from the snapshot taken before it.
            result.skipped.append(f"{name}: {type(e).__name__}")
            linker = splink.Linker(db.register("person_records", table_name=f"person_records_{i}"), before, log_level=None)
    predictions = linker.inference.predict(warning_mode="never")  # every compared pair; filtered below
    model = linker.misc.save_model_to_json()
    result.pairs_scored = int(scratch.fetch_all(exp.select("count(*)").from_(exp.to_table(predictions.physical_name)))[0][0])
    rows = scratch.fetch_dicts(_joined_predictions(predictions.physical_name), {"threshold": config.threshold})
    labels = _level_labels(model)
    kept = [r for r in rows if not _contradicts(r)]
    result.guarded = len(rows) - len(kept)
    prior_weight = math.log2(result.prior / (1 - result.prior))
    result.links = build_links(
        (
            {
                "a_type": r["a_type"], "a_value": r["a_value"], "b_type": r["b_type"], "b_value": r["b_value"],
                "score": _score(r["match_probability"]),
                "evidence": _evidence(r, labels, prior_weight),
            }
            for r in kept
        ),
        method=PERSON_RECORD,
        model_version=result.model_version,
        created_at=created_at,
    )  # fmt: skip
    predictions.drop_table_from_database_and_remove_from_cache()


def _joined_predictions(physical_name: str) -> exp.Expression:
    """Predictions with the identifiers of both records (Splink names its table; we quote it)."""
    query = parse(
        """SELECT l.id_type AS a_type, l.id_value AS a_value, r.id_type AS b_type, r.id_value AS b_value, p.*
           FROM predictions AS p
           JOIN person_records AS l ON l.record_id = p.record_id_l
           JOIN person_records AS r ON r.record_id = p.record_id_r
           WHERE p.match_probability >= $threshold
           ORDER BY p.record_id_l, p.record_id_r"""
    )
    return query.transform(  # type: ignore[return-value]
        lambda node: exp.to_table(physical_name).as_("p") if isinstance(node, exp.Table) and node.name == "predictions" else node
    )


def _level_labels(model: dict[str, Any]) -> dict[str, dict[int, str]]:
    """Per compared field, comparison vector value -> the level's label (NULL level: -1; then n-1 .. 0)."""
    out: dict[str, dict[int, str]] = {}
    for comparison in model["comparisons"]:
        levels = comparison["comparison_levels"]
        value = sum(1 for lv in levels if not lv.get("is_null_level"))
        labels: dict[int, str] = {}
        for lv in levels:
            if lv.get("is_null_level"):
                labels[-1] = lv["label_for_charts"]
            else:
                value -= 1
                labels[value] = lv["label_for_charts"]
        out[comparison["output_column_name"]] = labels
    return out


def _contradicts(row: dict[str, Any]) -> bool:
    """True when every GUARD field is present on both sides and at or below its contradiction level."""
    for column, worst in GUARD.items():
        gamma = row.get(f"gamma_{column}")
        if gamma is None or int(gamma) < 0 or int(gamma) > worst:
            return False
    return True


def _score(p: float | None) -> float:
    # Rounded so that sums taken in a different order by parallel threads do not change a stored score.
    return round(float(p or 0.0), 9)


def _evidence(row: dict[str, Any], labels: dict[str, dict[int, str]], prior_weight: float) -> str:
    fields = []
    for column, by_level in labels.items():
        gamma = row.get(f"gamma_{column}")
        weight = float(row.get(f"mw_{column}") or 0.0) + float(row.get(f"mw_tf_adj_{column}") or 0.0)
        fields.append(
            {
                "field": column,
                "level": by_level.get(int(gamma), str(gamma)) if gamma is not None else None,
                "match_weight": round(weight, 3),
            }
        )
    return json.dumps(
        {
            "records": [row["record_id_l"], row["record_id_r"]],
            "match_weight": round(float(row["match_weight"]), 3),
            "prior_match_weight": round(prior_weight, 3),
            "fields": fields,
        },
        sort_keys=True,
    )

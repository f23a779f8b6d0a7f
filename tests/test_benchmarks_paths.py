"""dfqvit.paths' result names and JSON, shared by the benchmarks: no run takes another's name, no NaN in JSON."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from dfqvit.paths import unique_stem, write_json


def test_a_taken_name_gets_the_next_suffix_and_is_reserved(tmp_path):
    suffixes = (".partial.json", ".json", ".md")
    assert unique_stem(tmp_path, "r_20260101_000000", suffixes) == "r_20260101_000000"
    assert (tmp_path / "r_20260101_000000.partial.json").exists()  # reserved at once, before the run writes
    assert unique_stem(tmp_path, "r_20260101_000000", suffixes) == "r_20260101_000000-2"
    (tmp_path / "r_20260101_000000-3.md").write_text("an earlier run's report")  # any of its files takes a name
    assert unique_stem(tmp_path, "r_20260101_000000", suffixes) == "r_20260101_000000-4"
    assert (tmp_path / "r_20260101_000000-3.md").read_text() == "an earlier run's report"


def test_concurrent_callers_never_share_a_name(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        stems = list(pool.map(lambda _: unique_stem(tmp_path, "run"), range(32)))
    assert len(set(stems)) == 32 and len(list(tmp_path.glob("run*.json"))) == 32


def test_json_is_strict_with_nan_and_infinity_as_null(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"ratio": float("nan"), "rows": [1.5, float("inf"), (-float("inf"), 2)], "n": 3})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"ratio": None, "rows": [1.5, None, [None, 2]],
                                                                   "n": 3}

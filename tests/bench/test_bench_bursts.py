"""Smoke test of `ditserve bench bursts --quick`: one burst of each abuse probe on a real
`ditserve up`. Checks that every probe was refused RESOURCE_EXHAUSTED (overload, not bad
input), that a real request completed after each burst, and that every service's RSS was
read; not the figures."""

from __future__ import annotations

import json

import pytest
from ditserve.cli import main

pytestmark = pytest.mark.slow  # a `ditserve up` of DiT-S/2: ~1 min, more under load


def test_bursts_are_refused_and_the_services_serve_on(tmp_path):
    assert main(["bench", "bursts", "--quick", "--set", "bursts=1",
                 "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bursts.json").read_text())["summary"]
    assert [(r["probe"], r["burst"]) for r in rows] == [
        ("baseline", 0), ("large requests", 1), ("announced payloads", 1)]
    assert rows[1]["codes"] == "3x RESOURCE_EXHAUSTED"
    assert rows[2]["codes"] == "2x RESOURCE_EXHAUSTED"
    for row in rows[1:]:
        assert row["request_s"] > 0  # the request after the burst completed
    services = {"coordinator", "decoder", "stage-0", "stage-1"}
    assert all(row[f"rss {name}"] > 0 for row in rows for name in services)

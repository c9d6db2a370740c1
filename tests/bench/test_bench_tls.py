"""Smoke test of `ditserve bench tls --quick`: both measures, plaintext and TLS side by side,
and the TLS variant is really TLS (the scenario checks that its coordinator refuses a
plaintext client). Figures are not checked: no timing assertions."""

from __future__ import annotations

import json

from ditserve.cli import main


def test_tls_scenario_measures_both_variants_of_both_measures(tmp_path):
    assert main(["bench", "tls", "--quick", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tls.json").read_text())
    rows = data["summary"]
    assert [(r["measure"].split(",")[0], r["variant"]) for r in rows] == [
        ("hop", "plaintext"), ("hop", "TLS"), ("2 clients", "plaintext"), ("2 clients", "TLS")]
    assert all(r["ratio"] > 0 for r in rows) and rows[0]["ratio"] == 1.0
    assert any("refuses a plaintext client" in note for note in data["notes"])
    hop = data["samples"]["hop 1 rows TLS"]
    assert len(hop["overhead_ms"]) == 3 and len(hop["connect_ms"]) == 1
    assert "| TLS |" in (tmp_path / "tls.md").read_text()

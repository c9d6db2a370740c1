"""Smoke test of `ditserve bench soak --quick`: a short soak on a real `ditserve up`, one
SIGKILL of each service kind. Checks the harness's accounting (every request sent ends as
exactly one outcome), that nothing is lost, and that each killed service was restarted and
reported by name; not the figures."""

from __future__ import annotations

import json

from ditserve.cli import main


def test_soak_accounts_for_every_request(tmp_path):
    assert main(["bench", "soak", "--quick", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "soak.json").read_text())
    rows = {row["what"]: row["value"] for row in data["summary"]}
    answered = sum(v for k, v in rows.items()
                   if k in ("completed", "cancelled by the client")
                   or k.startswith(("refused ", "failed ")))
    assert rows["sent"] == answered + rows["lost (never answered)"] and rows["sent"] > 0
    assert rows["lost (never answered)"] == 0 and rows["completed"] > 0
    samples = data["samples"]
    assert [k["service"] for k in samples["kills"]] == ["stage-0", "stage-1", "decoder",
                                                         "coordinator"]
    assert all(k["pid"] for k in samples["kills"])
    assert set(samples["restarts"]) == {"stage-0", "stage-1", "decoder", "coordinator"}
    assert set(samples["rss_mib"]["start"]) == set(samples["restarts"])
    assert all(v > 0 for v in samples["rss_mib"]["end"].values())
    table = (tmp_path / "soak.md").read_text()
    assert "| RSS coordinator (MiB) |" in table and "p90" in table

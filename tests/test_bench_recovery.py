"""`eep bench recovery` kills a rank under load, rejoins it, and reports a consistent record
(the speed targets live in the benchmark's figures, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eep.model.default_model import init_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


def test_bench_recovery_writes_a_consistent_record(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "recovery.json"
    cmd = [
        sys.executable, "-m", "eep", "bench", "recovery", "--model-path", str(model_dir), "--ep-size", "2",
        "--victim", "1", "--concurrency", "8", "--prompt-len", "8", "--output-len", "12", "--fault-at", "1.5",
        "--rejoin-after", "1", "--json", str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in the record: not standard JSON")

    result = json.loads(out.read_text(), parse_constant=no_constants)
    summary = json.loads(done.stdout, parse_constant=no_constants)
    keys = ("recovery_pause_s", "reintegration_pause_s", "time_to_95_s", "reached_95", "rejoin_s", "requests_lost",
            "outputs_differing")
    assert set(summary) == set(keys) and all(summary[k] == result[k] for k in keys)
    assert result["requests_lost"] == 0 and result["outputs_differing"] == 0
    assert 0 < result["recovery_pause_s"] < 30
    times = result["times"]
    assert result["rejoin_s"] == times["rejoined"] - times["rejoin_requested"] > 0
    # never None: when the rate never came back within the run, the time to the run's end (a lower bound)
    assert isinstance(result["time_to_95_s"], float) and result["time_to_95_s"] >= 0
    assert isinstance(result["reached_95"], bool)
    kinds = [e["kind"] for e in result["events"]]
    assert kinds[:4] == ["view_committed", "fault_seen", "view_committed", "repair"] and "rejoined" in kinds
    repair = result["repairs"][0]
    assert repair["dead"] == [1] and repair["tier2_experts"] == len(repair["experts"]) > 0
    assert {e["source"] for e in repair["experts"]} <= {"backup", "disk"}
    assert len(result["series"]["t"]) == len(result["series"]["tokens"]) > 0

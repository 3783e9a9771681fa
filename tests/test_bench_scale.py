"""`eep bench scale`: a real `eep serve --http` scaled up and down under streaming clients, its
outputs checked against a server never scaled. The record must be complete and consistent, and
nothing lost or differing; the speed figures live in the benchmark's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eep.model.default_model import init_model


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "skewed", "deepseek_v3", router_skew=1.0)


def test_the_scale_bench_scales_up_and_down_and_loses_nothing(skewed: Path, tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run(
        [sys.executable, "-m", "eep", "bench", "scale", "--model-path", str(skewed), "--ep-size", "3",
         "--ep-max-size", "4", "--sizes", "4,2", "--ep-num-redundant-experts", "2", "--concurrency", "6", "--steady", "4", "--settle", "3",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["requests_lost"] == 0 and summary["outputs_differing"] == 0, summary
    assert summary["final_active"] == [0, 1]
    up, down = summary["operations"]
    assert (up["from_ep_size"], up["ep_size"], up["added"]) == (3, 4, [3])
    assert (down["from_ep_size"], down["ep_size"], sorted(down["removed"])) == (4, 2, [2, 3])
    for op in (up, down):
        assert op["seconds"] > 0 and op["pause_s"] >= 0 and op["tokens_per_s_after"] > 0
    assert summary["pause_aa_s"]["n"] > 0 and summary["tokens_per_s_before"] > 0
    assert "| 3 -> 4 |" in run.stdout

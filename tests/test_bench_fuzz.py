"""`eep bench fuzz`, a short seeded run: every door of a live two-host instance (controller,
data addresses, backup servers, HTTP) attacked from a third namespace host while streaming
clients run. Nothing may run, nothing may be lost or differ, no rank may fail, the instance
must be healthy at the end and no process may keep a file open for an attacker. Root only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eep.model.default_model import init_model
from eep.testbed.netns import available

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())), pytest.mark.slow]


def test_a_short_fuzz_of_every_door_runs_nothing_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    model = init_model(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "-m", "eep", "bench", "fuzz", "--model-path", str(model), "--concurrency",
                           "4", "--connections", "200", "--seed", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["code_executed"] is False
    assert s["requests"] > 0 and s["requests_lost"] == 0 and s["outputs_differing"] == 0, result["errors"]
    assert s["ranks_failed"] == 0 and s["healthy_at_end"] is True
    assert s["fd_growth"] == 0, result["open_files"]
    assert s["attempts"] >= 200 and s["rejections_logged"] > 0
    kinds = result["attempts_by_kind"]
    for kind in ("poc_pickle_frame", "wrong_secret", "oversize_frame", "captured_replay",
                 "replay_of_recorded_connection", "authenticated_replay", "open_and_drop"):
        assert kinds.get(kind), (kind, kinds)

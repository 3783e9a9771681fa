"""`eep bench hosts`: four real servers on namespace hosts (cross-host eep, the same ranks on
one host, gloo across the hosts, cross-host eep with a plain data plane), async HTTP clients, a remote rank killed, a host lost and
returned, a partition healed. The record must be complete, nothing lost, no wrong token, no
step from a fenced rank; the speed targets live in the benchmark's figures, not here. Root only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eep.model.default_model import init_model
from eep.testbed.netns import available

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())), pytest.mark.slow]

KEYS = ("cross_host_over_single_host", "cross_host_over_gloo", "cross_host_over_insecure_data_plane",
        "host_loss_detection_s", "host_loss_pause_s",
        "host_rejoin_pause_s", "partition_pause_s", "steps_committed_by_fenced_ranks", "requests_lost",
        "outputs_differing")


def test_the_hosts_bench_writes_a_complete_record_and_loses_nothing(tmp_path: Path) -> None:
    model = init_model(tmp_path / "m", "qwen3_moe")
    out = tmp_path / "hosts.json"
    cmd = [sys.executable, "-m", "eep", "bench", "hosts", "--model-path", str(model), "--concurrency", "4",
           "--prompt-len", "8", "--output-len", "8", "--steady-rounds", "1", "--steady-slice", "2",
           "--json", str(out), "--plot", str(tmp_path / "hosts.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    s = result["summary"]
    assert all(s.get(k) is not None for k in KEYS), {k: s.get(k) for k in KEYS}
    assert s["requests_lost"] == 0 and s["outputs_differing"] == 0 and s["steps_committed_by_fenced_ranks"] == 0
    auth = s["data_plane_auth"]  # the A/B of the CURVE data plane: both sides measured
    assert all(auth[k][side] is not None for k in ("step_ms", "exchange_critical_ms") for side in ("curve", "insecure"))
    ft = result["config"]["failure_timeout_s"]
    # the lost host was found by its silence, not by a timeout of the data plane (30 s)
    assert 0.5 * ft < s["host_loss_detection_s"] < 5 * ft
    run = result["run"]
    assert run["times"]["fenced_agent_exit_code"] == 1  # the cut-off agent left on its own
    assert run["requests_completed"] == run["requests"] > 0
    assert set(result["targets_met"]) >= {"no_request_lost", "no_output_differing", "no_step_from_fenced_ranks"}
    assert (tmp_path / "hosts.png").stat().st_size > 0

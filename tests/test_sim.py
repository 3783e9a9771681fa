"""`eep sim`: hand-computable cases, the constants table and the two reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep.sim.cluster import DEFAULT_CLUSTER, Cluster, ModelShape
from eep.sim.constants import CONSTANTS, PUBLISHED, constants_at, markdown_table
from eep.sim.des import simulate
from eep.sim.systems import SYSTEMS, Layout, Scenario, plan_for, respond

ROOT = Path(__file__).resolve().parents[1]

# 4 experts in 1 MoE layer, each 3 x 1000 x 1000 one-byte weights: 3 MB
TINY = ModelShape(name="tiny", hidden_size=1000, moe_intermediate_size=1000, n_routed_experts=4, n_shared_experts=0,
                  num_experts_per_tok=2, num_hidden_layers=1, first_k_dense_replace=0, weight_bytes_per_param=1,
                  total_params=4 * 3e6 + 1e6)  # + 1 MB that every rank holds
# 2 nodes of 2 GPUs; host memory reaches a GPU at 3 GB/s, the NIC too: every backup copy takes 1 ms
TWO_NODES = Cluster(name="two nodes", gpus_per_node=2, nvlink_bytes_per_s=10e9, rdma_bytes_per_s=3e9,
                    pcie_bytes_per_s=3e9, nvme_bytes_per_s=0.3e9, host_memory_bytes=1e12)


def _constants(**overrides: float) -> dict[str, float]:
    return {**constants_at("value"), "decode_step_s": 0.05, "eep_death_notice_s": 0.001,
            "eep_failure_timeout_s": 1.0, **overrides}


@pytest.mark.parametrize("failure, detection_s", [("crash", 0.001), ("hang", 1.0)])
def test_eeps_pause_is_detection_plus_the_slowest_copy_plus_one_replayed_step(failure: str, detection_s: float) -> None:
    scenario = Scenario(4, (1,), fail_at_s=10.0, horizon_s=200.0, failure=failure,  # type: ignore[arg-type]
                        redundant=0)
    layout = Layout.of(TINY, TWO_NODES, 4, 0)
    plan, _ = plan_for(layout, TINY, TWO_NODES, (1,))
    # rank 1 held the only replica of one expert: one copy, from a host-memory backup, 3 MB at 3 GB/s
    assert [(t.source_kind, t.nbytes) for t in plan.transfers] == [("backup", 3_000_000)]
    assert plan.est_makespan_s == pytest.approx(0.001)
    c = _constants()
    resp = respond("eep", scenario, TINY, TWO_NODES, c, plan=(plan, 0.0))
    _, figures = simulate(resp, scenario, c)
    assert figures["recovery_pause_s"] == pytest.approx(detection_s + 0.001 + 0.05)
    assert figures["reintegration_pause_s"] == pytest.approx(0.05)  # the switch-in: one step
    assert figures["unavailable_s"] == pytest.approx(detection_s + 0.001 + 0.05 + 0.05)


def test_a_schedule_without_a_failure_serves_the_steady_rate_exactly() -> None:
    scenario = Scenario(4, (), fail_at_s=0.0, horizon_s=100.0, redundant=0)
    c = _constants()
    for system in SYSTEMS:
        timeline, figures = simulate(respond(system, scenario, TINY, TWO_NODES, c), scenario, c)
        assert timeline.segments == [(0.0, 100.0, 4 * c["decode_tokens_per_s_per_gpu"], "steady")]
        assert timeline.tokens() == 4 * c["decode_tokens_per_s_per_gpu"] * 100.0
        assert figures["tokens_lost"] == 0.0 and figures["unavailable_s"] == 0.0


def test_a_full_restart_is_the_sum_of_its_phases_and_then_prefills_every_request_again() -> None:
    scenario = Scenario(4, (1,), fail_at_s=10.0, horizon_s=2000.0, redundant=0)
    c = _constants()
    resp = respond("full_restart", scenario, TINY, TWO_NODES, c)
    rank_bytes = 1e6 + 3e6  # the shared megabyte and its expert (a spare slot holds nothing)
    load_s = 2 * rank_bytes / 0.3e9  # the node's 2 GPUs read from its NVMe at once
    expected = (c["deepep_timeout_s"] + c["scheduler_restart_s"] + c["process_start_s"] + load_s
                + c["deepgemm_warmup_s"] + c["cuda_graph_capture_s"])
    timeline, figures = simulate(resp, scenario, c)
    assert figures["recovery_pause_s"] == pytest.approx(expected)
    batch = c["decode_tokens_per_s_per_gpu"] * c["decode_step_s"]
    prefill_s = batch * c["kv_tokens_per_request"] / c["prefill_tokens_per_s_per_gpu"]  # every GPU its own batch
    assert figures["unavailable_s"] == pytest.approx(expected + prefill_s)
    assert figures["time_to_95_s"] == pytest.approx(expected + prefill_s)
    assert timeline.rate_at(10.0 + expected + prefill_s + 1) == timeline.steady


def test_sglang_loses_the_dead_ranks_requests_and_waits_out_its_timeout() -> None:
    c = _constants()
    for k in (1, 2):
        scenario = Scenario(4, tuple(range(k)), fail_at_s=10.0, redundant=0)
        layout = Layout.of(TINY, TWO_NODES, 4, 0, ranks_lost=k)
        plan = plan_for(layout, TINY, TWO_NODES, scenario.failed)
        resp = respond("sglang", scenario, TINY, TWO_NODES, c, plan=plan, layout=layout)
        assert resp.requests_lost == round(k * c["decode_tokens_per_s_per_gpu"] * c["decode_step_s"])
        timeline, figures = simulate(resp, scenario, c)
        # nothing served for the timeout, the copies and the batch run again; then the survivors
        # serve at once (nothing to prefill again: the dead ranks' requests are gone)
        expected = c["sglang_dispatch_timeout_s"] + plan[0].est_makespan_s + c["decode_step_s"]
        assert _zero_stretch(timeline, 10.0) == pytest.approx(expected)
        assert timeline.rate_at(10.0 + expected + 1e-6) == (4 - k) * c["decode_tokens_per_s_per_gpu"]


def test_every_constant_has_a_source_and_a_range_around_its_value() -> None:
    for name, const in CONSTANTS.items():
        low, high = const.range
        assert const.source and low <= const.value <= high, name
        if const.kind == "unknown":
            assert low < high, f"{name}: an unknown figure needs the range it leaves"
    assert not set(PUBLISHED) - set(SYSTEMS)


def test_the_cluster_file_and_the_docs_say_what_the_constants_table_says() -> None:
    cluster = json.loads(DEFAULT_CLUSTER.read_text())
    for key in ("nvlink_bytes_per_s", "rdma_bytes_per_s", "pcie_bytes_per_s", "nvme_bytes_per_s", "host_memory_bytes"):
        assert float(cluster[key]) == CONSTANTS[key].value, key
    assert markdown_table() in (ROOT / "docs" / "sim.md").read_text(), \
        "docs/sim.md's constants table is stale: paste eep.sim.constants.markdown_table() into it"


def test_eep_sim_paper_and_scale_write_their_records(tmp_path: Path) -> None:
    paper, scale = tmp_path / "paper.json", tmp_path / "scale.json"
    for cmd, out, extra in (("paper", paper, []), ("scale", scale, ["--ep-sizes", "32,64"])):
        subprocess.run([sys.executable, "-m", "eep", "sim", cmd, "--json", str(out), "--plot",
                        str(out.with_suffix(".png")), *extra], check=True, timeout=300, capture_output=True)
        assert out.with_suffix(".png").stat().st_size > 10_000
    p = json.loads(paper.read_text())
    assert set(p["summary"]) == set(SYSTEMS)
    for system, figures in p["summary"].items():
        assert set(figures) >= {"recovery_pause_s", "reintegration_pause_s", "time_to_95_s", "unavailable_s"}
    assert p["summary"]["eep"]["recovery_pause_s"] < p["summary"]["sglang"]["recovery_pause_s"] \
        < p["summary"]["full_restart"]["recovery_pause_s"]
    for system, pub in p["published"].items():
        for key, value in pub.items():
            assert p["relative_error"][system][key] == pytest.approx((p["summary"][system][key] - value) / value)
    assert [row["failed"] for row in p["sglang_table"]["rows"]] == [1, 2, 4, 8, 16]
    s = json.loads(scale.read_text())
    assert [r["ep"] for r in s["rows"]] == [32, 64]
    assert all(r["plan_ms"]["max"] > 0 and r["repair"]["bytes_moved"] > 0 for r in s["rows"])  # eep's real plans
    assert p["layout"]["backup_bytes_per_node"] <= json.loads(DEFAULT_CLUSTER.read_text())["host_memory_bytes"]
    assert 0 < s["summary"]["planner_max_ms"] == max(c["plan_ms"]["max"] for c in s["planner_cases"])


def _zero_stretch(timeline: object, start: float) -> float:
    """How long the rate stays 0 from `start` on."""
    total = 0.0
    for s, e, rate, _ in timeline.segments:  # type: ignore[attr-defined]
        if e <= start:
            continue
        if rate != 0.0:
            break
        total += e - max(s, start)
    return total


@settings(max_examples=60, deadline=None, derandomize=True)
@given(system=st.sampled_from(SYSTEMS), failed=st.sets(st.integers(0, 3), min_size=1, max_size=3),
       fail_at=st.floats(0.0, 50.0), failure=st.sampled_from(["crash", "hang"]), rejoin=st.booleans(),
       at=st.sampled_from(["low", "value", "high"]))
def test_any_failure_keeps_the_timeline_consistent(system: str, failed: set[int], fail_at: float, failure: str,
                                                  rejoin: bool, at: str) -> None:
    """Random failures of the tiny instance (derandomized: the same examples every run): the
    timeline is contiguous and runs past its last event, the rate never exceeds the steady one,
    the instance serves nothing for exactly its pause after the failure, and the committed views
    end with every rank back exactly when one came back."""
    scenario = Scenario(4, tuple(sorted(failed)), fail_at_s=fail_at, horizon_s=400.0,
                        failure=failure, redundant=0, rejoin=rejoin)  # type: ignore[arg-type]
    c = {**constants_at(at), "decode_step_s": 0.05}
    resp = respond(system, scenario, TINY, TWO_NODES, c)
    timeline, figures = simulate(resp, scenario, c)
    segments = timeline.segments
    end = segments[-1][1]
    assert segments[0][0] == 0.0 and end >= 400.0 and end > timeline.events[-1]["t"]
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))  # no gap, no overlap
    assert all(0.0 <= rate <= timeline.steady for _, _, rate, _ in segments)
    assert timeline.tokens(fail_at) <= timeline.steady * (end - fail_at) + 1e-6
    zero = _zero_stretch(timeline, fail_at)
    if system == "full_restart":  # every lost request prefilled again before a token: longer
        assert zero >= sum(p.seconds for p in resp.pause) - 1e-9
    else:
        assert zero == pytest.approx(sum(p.seconds for p in resp.pause))
    assert figures["unavailable_s"] >= zero - 1e-9
    back = figures["time_to_95_s"]
    assert back is None or back >= figures["recovery_pause_s"] - 1e-9
    views = [e for e in timeline.events if e["event"] == "view"]
    assert views[0]["active"] == 4 - len(failed)  # the failure: one commit, epoch + 1
    if system != "full_restart":  # (a restart is a new instance: its epochs start again)
        assert [v["epoch"] for v in views] == sorted(v["epoch"] for v in views)
    kinds = {e["event"] for e in timeline.events}
    everyone = views[-1]["active"] == 4
    assert everyone == ("resume" in kinds if system == "full_restart" else "switched_in" in kinds)
    assert everyone or system == "full_restart" or not rejoin or figures["reintegration_pause_s"] is None
    reprefill_over = resp.reprefill_tokens == 0 or resp.reprefill_share == 0 or "reprefill_done" in kinds
    if everyone and reprefill_over:
        assert timeline.rate_at(end - 0.5) == timeline.steady

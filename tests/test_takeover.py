"""No single head (`eep.bench.head.run_schedule`, the same run `eep bench head` makes): three
namespace hosts x two ranks, the head on node 0 and a standby head on node 1 (`eep serve
--standby`), a real three-member etcd. Node 0 is lost while 16 clients stream; each client sends
the same request to the other head's address with the standard `Last-Event-ID`. The standby
takes the leader key once the head's lease lapsed, the agents follow it, it adopts the running
ranks (none restarted), repairs coverage and admits the streams again from their committed
tokens: every client gets exactly the tokens of an unbroken run (greedy and seeded); two
non-streaming completions retried with the same `X-Request-Id` get theirs too.
- `killed`: node 0's link cut and everything on it SIGKILLed;
- `partitioned`: its link cut only: the old head, alive, is deposed by its own clock (its lease
  cannot be renewed while a standby follows it), serves and commits nothing more, also after
  the heal; no epoch is committed by both heads.
Root only."""

from __future__ import annotations

from pathlib import Path

import pytest

from eep.bench.head import plot, run_schedule, summary_table
from eep.model.default_model import init_model
from eep.testbed.netns import available

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())), pytest.mark.slow]

TTL_S = 2.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("takeover") / "m", "qwen3_moe")


@pytest.mark.parametrize("loss", ["killed", "partitioned"])
def test_the_standby_takes_over_from_a_lost_node_0_and_every_stream_finishes_exactly(model_dir: Path, loss: str,
                                                                                     tmp_path: Path) -> None:
    run = run_schedule(str(model_dir), loss, concurrency=16, head_lease_ttl_s=TTL_S)
    result = {"config": {"schedules": [loss]}, "summary": {loss: run["summary"]}, "runs": {loss: run}}
    plot(result, str(tmp_path / "head.png"))  # what `eep bench head` writes besides its JSON
    assert (tmp_path / "head.png").stat().st_size > 0 and loss in summary_table(result)
    m, new, tail = run["summary"], run["new_head"], run["standby_log_tail"]
    assert [c for c in run["clients"] if not c["done"]] == [], f"{run['clients']}\n{tail}"
    assert m["requests_lost"] == 0 and m["outputs_differing"] == 0, (run["differing"], tail)
    assert m["ranks_restarted"] == 0  # the surviving hosts' ranks are the same processes
    assert m["views_committed_by_two_heads"] == 0
    assert m["takeover_s"] is not None and m["takeover_s"] < 30, m  # a bound of the test; the target: the bench
    assert new["health"] == 200 and sorted(new["active"]) == [2, 3, 4, 5], new
    assert any(e["kind"] == "taken_over" for e in new["events"])
    assert new["leader"] == "node1" and new["committed_epoch"] == new["epoch"] and new["new_request_exact"]
    if loss == "partitioned":
        old = run["old_head"]
        assert old["health"]["code"] == 503 and "no longer leads" in old["health"]["reason"], old
        assert m["old_head_served_after_loss_s"] is not None and m["old_head_served_after_loss_s"] <= TTL_S + 1.0
        new_epochs = [e["epoch"] for e in new["events"] if e["kind"] == "view_committed"]
        assert old["epochs"] and max(old["epochs"]) < min(new_epochs), (old["epochs"], new_epochs)

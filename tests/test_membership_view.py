"""The membership view: epochs only grow, and only changes of the active set bump them."""

from __future__ import annotations

import pytest

from eep.errors import MembershipError
from eep.membership.view import MembershipView, RankState


def test_fail_rejoin_cycle_bumps_the_epoch_exactly_when_the_active_set_changes() -> None:
    v0 = MembershipView.initial((11, 12, 13, 14))
    assert (v0.epoch, v0.active_ranks) == (0, (0, 1, 2, 3))
    v2 = v0.fail({2})
    assert (v2.epoch, v2.active_ranks, v2.active_mask) == (1, (0, 1, 3), (True, True, False, True))
    assert v2.fail({2}) is v2  # already failed: no new epoch
    v3 = v2.begin_join(2, 21)
    assert v3.epoch == 1 and v3.states[2] is RankState.JOINING and v3.incarnations[2] == 21
    assert v3.active_ranks == (0, 1, 3)
    v4 = v3.activate(2)
    assert (v4.epoch, v4.active_ranks, v4.incarnations) == (2, (0, 1, 2, 3), (11, 12, 21, 14))
    # a joiner that dies before it was switched in leaves the active set unchanged: same epoch
    v5 = v4.fail({1}).begin_join(1, 31).fail({1})
    assert v5.epoch == 3 and v5.states[1] is RankState.FAILED


def test_absent_ranks_join_and_leave_without_ever_failing() -> None:
    v0 = MembershipView.initial((1, 2, 0, 0), absent={2, 3})  # sized for 4, started on 2
    assert v0.active_ranks == (0, 1) and v0.ranks_in(RankState.ABSENT) == (2, 3)
    assert v0.fail({3}) is v0  # an absent rank has nothing to fail
    v1 = v0.begin_join(2, 7).activate(2)
    assert (v1.epoch, v1.active_ranks) == (1, (0, 1, 2))
    v2 = v1.remove({0})  # scaled down: out of the step (epoch + 1), absent, not failed
    assert (v2.epoch, v2.states[0]) == (2, RankState.ABSENT)
    v3 = v2.fail({1}).remove({1})  # a failed rank removed: no new epoch
    assert (v3.epoch, v3.states[1], v3.active_ranks) == (3, RankState.ABSENT, (2,))
    assert v3.to_dict()["ranks"][1]["state"] == "absent"
    with pytest.raises(MembershipError, match="not absent"):
        MembershipView.initial((0, 0), absent={0, 1})


def test_two_ranks_at_once_is_one_epoch() -> None:
    v = MembershipView.initial((1, 2, 3, 4)).fail({0, 3})
    assert (v.epoch, v.active_ranks) == (1, (1, 2))
    assert v.to_dict()["active"] == [1, 2]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda v: v.activate(1), "only a joining rank"),
        (lambda v: v.begin_join(1, 99), "only a failed or absent rank"),
        (lambda v: v.remove({0, 1}).remove({2}), "nothing is left"),
        (lambda v: v.fail({1}).begin_join(1, 2), "already used"),
        (lambda v: v.fail({0, 1, 2}), "nothing is left"),
        (lambda v: v.fail({7}), "outside 0..2"),
    ],
)
def test_forbidden_transitions_say_why(make, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MembershipError, match=fragment):
        make(MembershipView.initial((1, 2, 3)))

"""Rank failures in a running expert-parallel instance: real rank processes, real signals.

What is checked: a SIGKILLed or SIGSTOPped rank is detected, the view changes, coverage is
repaired (tier 1 reuse when redundant replicas cover the dead rank, tier 2 copies otherwise),
the faulted step is replayed and the dead rank's requests finish on survivors with exactly the
tokens of the fault-free run (bf16: every kernel on the path is row- and placement-invariant,
so exact means bitwise here); the rank rejoins; survivors never reallocate; nothing leaks.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from eep.config import EngineConfig
from eep.control.config import EPConfig
from eep.control.executor import EPExecutor
from eep.engine.engine import LLMEngine
from eep.engine.request import Request
from eep.engine.sampling import SamplingParams
from eep.membership.view import MembershipView, RankState
from eep.model.default_model import init_model
from eep.runtime import wire
from eep.runtime.rank import EXIT_FENCED

NUM_REQUESTS = 32
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.9, top_p=0.95, seed=11)
PARAMS = [SEEDED if i % 4 == 3 else GREEDY for i in range(NUM_REQUESTS)]  # seeded sampling stays reproducible


def _prompts(seed: int, n: int = NUM_REQUESTS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4000) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


PROMPTS = _prompts(0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


def _config(model_dir: Path) -> EngineConfig:
    return EngineConfig(str(model_dir), dtype="bfloat16", max_num_seqs=16, max_model_len=96, progress=False)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    """Fault-free outputs, from the single-process engine."""
    engine = LLMEngine(_config(model_dir))
    try:
        return [o.output_ids for o in engine.generate(PROMPTS, PARAMS)]
    finally:
        engine.close()


def _instance(model_dir: Path, **ep: object) -> LLMEngine:
    kw: dict[str, object] = {"ep_size": 4, "failure_timeout_s": 0.5, "timeout_s": 10.0}
    return LLMEngine(_config(model_dir), EPExecutor(_config(model_dir), EPConfig(**(kw | ep))))  # type: ignore[arg-type]


@pytest.fixture
def engine(model_dir: Path) -> Iterator[LLMEngine]:
    """4 ranks, no redundant experts (a death loses experts: tier 2), manual rejoin."""
    e = _instance(model_dir)
    yield e
    e.close()


def _executor(engine: LLMEngine) -> EPExecutor:
    assert isinstance(engine.executor, EPExecutor)
    return engine.executor


def _run(engine: LLMEngine, prompts: list[list[int]], at_step: int | None = None, sig: int = signal.SIGKILL,
         victims: tuple[int, ...] = ()) -> list[Request]:
    """Run `prompts` to completion; send `sig` to `victims` before step `at_step`."""
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, PARAMS)]
    step, deadline = 0, time.monotonic() + 60
    while not all(r.finished for r in reqs):
        assert time.monotonic() < deadline, "the instance stopped making progress"
        if step == at_step:
            pids = _executor(engine).pids()
            for v in victims:
                os.kill(pids[v], sig)
        engine.step()
        step += 1
    return reqs


def _rejoin(engine: LLMEngine, rank: int) -> None:
    ex = _executor(engine)
    ex.rejoin(rank)
    deadline = time.monotonic() + 120
    while ex.view.states[rank] is not RankState.ACTIVE:
        assert time.monotonic() < deadline, f"rank {rank} did not come back: {ex.status()['events']}"
        engine.step()
        time.sleep(0.05)


def _outputs(reqs: list[Request]) -> list[list[int]]:
    return [r.output_ids for r in reqs]


def test_sigkill_of_each_rank_position_is_repaired_exactly_and_the_rank_rejoins(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    ex = _executor(engine)
    assert _outputs(_run(engine, PROMPTS)) == reference  # the instance itself is exact
    for victim in range(4):
        before = ex.storage_ptrs()
        survivors = [r for r in range(4) if r != victim]
        epoch = ex.view.epoch
        reqs = _run(engine, PROMPTS, at_step=4 + victim, victims=(victim,))
        assert _outputs(reqs) == reference, f"outputs changed after rank {victim} died"
        assert ex.view.epoch > epoch and ex.view.states[victim] is RankState.FAILED
        repair = ex.repairs[-1]
        assert repair["dead"] == [victim] and repair["tier2_experts"] > 0 and repair["bytes_moved"] > 0
        assert ex.coverage()["none"] == 0
        after_failure = dict(zip(ex.view.active_ranks, ex.storage_ptrs()))
        _rejoin(engine, victim)
        after_rejoin = dict(zip(ex.view.active_ranks, ex.storage_ptrs()))
        for r in survivors:  # survivors never reallocate tables, slots or data-plane buffers
            assert after_failure[r] == before[r] and after_rejoin[r] == before[r]
        assert _outputs(_run(engine, PROMPTS)) == reference, f"outputs changed after rank {victim} rejoined"
    rejoins = [r for r in ex.repairs if "rejoined" in r]
    assert len(rejoins) == 4 and all(r["warmup_s"] > 0 for r in rejoins)  # each warmed up alone first
    kinds = [e.kind for e in ex.events]
    for kind in ("fault_seen", "view_committed", "repair", "rejoin_started", "rejoined"):
        assert kinds.count(kind) >= 4, kinds


def test_the_step_after_a_failure_replays_only_the_survivors_work(
    engine: LLMEngine, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step under the new epoch runs what survived of the failed one and admits
    nothing; the dead rank's requests are prefilled again from the step after, in chunks of at
    most max_prefill_tokens while others decode. Outputs stay exact."""
    ex = _executor(engine)
    plans: list[tuple[int, int, list[tuple[Request, int]], list[Request]]] = []
    for rank, scheduler in enumerate(engine.schedulers):
        def recording(admit: bool = True, others_decode: bool = False, _s=scheduler, _r=rank,  # type: ignore[no-untyped-def]
                      _orig=scheduler.schedule):
            running = list(_s.running)
            plan = _orig(admit, others_decode)
            plans.append((ex.view.epoch, _r, [(x.request, x.q_len) for x in plan], running))
            return plan
        monkeypatch.setattr(scheduler, "schedule", recording)
    victim = 2
    doomed: list[Request] = []
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    for step in range(200):
        if all(r.finished for r in reqs):
            break
        if step == 5:
            doomed = list(engine.schedulers[victim].running)
            os.kill(ex.pids()[victim], signal.SIGKILL)
        engine.step()
    assert _outputs(reqs) == reference and doomed
    replay = [(r, plan, running) for epoch, r, plan, running in plans if epoch == 1]
    first = replay[:3]  # one plan per survivor
    assert sorted(r for r, _, _ in first) == [0, 1, 3]
    for _, plan, running in first:
        assert plan and all(req in running and req not in doomed for req, _ in plan)
    budget = engine.config.max_prefill_tokens
    later = [(req, q) for _, plan, _ in replay[3:] for req, q in plan]
    assert {id(req) for req, _ in later} >= {id(req) for req in doomed}  # every orphan was prefilled again
    for _, plan, _ in replay[3:]:
        if any(q == 1 for _, q in plan):
            assert sum(q for _, q in plan if q > 1) <= budget


def test_the_repair_plan_is_made_ahead_and_is_the_plan_of_the_failure(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    ex = _executor(engine)
    _run(engine, PROMPTS)
    _run(engine, PROMPTS)  # more than 20 steps: the planner has started
    assert ex.coverage_keeper.planner.started
    ex.coverage_keeper.planner.join(30)
    ready = ex.coverage_keeper.planner.plans
    assert set(ready) == {frozenset({r}) for r in range(4)}
    placement, held, view = ex.placement, ex.held.clone(), ex.view
    reqs = _run(engine, PROMPTS, at_step=3, victims=(2,))
    assert _outputs(reqs) == reference
    assert ex.repairs[-1]["plan_ready"] is True and ex.repairs[-1]["dead"] == [2]
    fresh = ex.coverage_keeper.plan(view.fail({2}), placement, held)  # what the failure would have planned
    made = ready[frozenset({2})][2]
    assert made.transfers == fresh.transfers and made.tiers == fresh.tiers
    assert torch.equal(made.placement.physical_to_logical_map, fresh.placement.physical_to_logical_map)


def test_the_ledger_charges_elastic_bookkeeping_against_all_the_work(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    """While nothing fails the elastic instance's extra work is on its ledger (ranks' heartbeat
    threads, the controller's heartbeat looks and step boundaries, the plan made ahead), a
    small share of the CPU time of the controller and every rank."""
    ex = _executor(engine)
    before = ex.status()["accounting"]
    for _ in range(5):  # until the plans are made ahead (a number of steps after the last view change)
        assert _outputs(_run(engine, PROMPTS)) == reference
        if ex.coverage_keeper.planner.started:
            break
    assert ex.coverage_keeper.planner.started
    ex.coverage_keeper.planner.join(10)  # the plans are charged when made
    after = ex.status()["accounting"]
    books = {k: v - before["bookkeeping_cpu_s"][k] for k, v in after["bookkeeping_cpu_s"].items()}  # type: ignore[index]
    cpu = after["cpu_s"] - before["cpu_s"]  # type: ignore[index]
    assert all(v > 0 for v in books.values()), books
    assert cpu > 0 and sum(books.values()) < 0.1 * cpu, (books, cpu)


def test_two_ranks_killed_at_once(model_dir: Path, reference: list[list[int]]) -> None:
    """Two deaths in one step, one view change; spare slots for both ranks' experts."""
    engine = _instance(model_dir, num_spare_slots=16)
    try:
        ex = _executor(engine)
        reqs = _run(engine, PROMPTS, at_step=5, victims=(1, 2))
        assert _outputs(reqs) == reference
        assert set(ex.view.active_ranks) == {0, 3} and ex.coverage()["none"] == 0
        assert ex.repairs[-1]["dead"] == [1, 2]
        for r in (1, 2):
            _rejoin(engine, r)
        assert _outputs(_run(engine, PROMPTS)) == reference
    finally:
        engine.close()


def test_sigstop_is_detected_fenced_on_sigcont_and_rejoins(engine: LLMEngine, reference: list[list[int]]) -> None:
    ex = _executor(engine)
    victim = 3
    proc = ex.pool.process(victim)
    assert proc is not None
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    for _ in range(3):
        engine.step()
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        stopped = time.time()
        while ex.view.states[victim] is not RankState.FAILED:
            engine.step()
            assert time.time() - stopped < 10
        seen = next(e for e in ex.events if e.kind == "fault_seen" and e.rank == victim)
        assert "heartbeat" in seen.detail
        assert seen.time - stopped <= 2 * ex.ep.failure_timeout_s, seen.time - stopped
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    assert proc.proc.wait(timeout=30) == EXIT_FENCED  # it woke up, saw it was out of the view, and left
    while not all(r.finished for r in reqs):
        engine.step()
    assert _outputs(reqs) == reference
    _rejoin(engine, victim)
    assert _outputs(_run(engine, PROMPTS)) == reference


def test_20_kill_rejoin_cycles_at_random_points_lose_nothing_and_leak_nothing(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    """20 SIGKILLs of a random rank at a random step of 32 concurrent requests, each followed
    by a rejoin; in one cycle the joiner itself is killed while it loads."""
    ex = _executor(engine)
    def shm_files() -> tuple[list[str], int]:  # a death notice per rank process: new names, same count
        names = sorted(os.listdir("/dev/shm"))
        return [n for n in names if "-dn-" not in n], sum("-dn-" in n for n in names)

    fds, shm = len(os.listdir("/proc/self/fd")), shm_files()
    rng = random.Random(3)
    for cycle in range(20):
        victim = rng.randrange(4)
        reqs = _run(engine, PROMPTS, at_step=rng.randrange(1, MAX_TOKENS), victims=(victim,))
        assert all(r.finished for r in reqs) and _outputs(reqs) == reference, f"cycle {cycle}, rank {victim}"
        if cycle == 2:  # the joiner dies while loading: it fails again, and rejoins after
            ex.rejoin(victim)
            os.kill(ex.pids()[victim], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while ex.view.states[victim] is not RankState.FAILED:
                assert time.monotonic() < deadline
                engine.step()
                time.sleep(0.05)
        _rejoin(engine, victim)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert shm_files() == shm
    assert len([p for p in ex.pids() if p]) == 4 and ex.view.epoch >= 40


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def test_ranks_are_forked_from_one_server_whose_death_takes_no_rank(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    ex = _executor(engine)
    [server] = {_parent(p) for p in ex.pids()}  # every rank forked from one interpreter of this host
    assert _parent(server) == os.getpid() and server not in ex.pids()
    assert _outputs(_run(engine, PROMPTS, at_step=2, victims=(1,))) == reference
    _rejoin(engine, 1)
    assert _parent(ex.pids()[1]) == server  # the rejoin forked too (no interpreter's start)
    reaped = [e for e in ex.events if e.kind == "reaped" and e.rank == 1]
    assert reaped and reaped[-1].detail.endswith(f"code {-signal.SIGKILL}"), reaped  # its exit code, relayed
    os.kill(server, signal.SIGKILL)  # the fork server lost: every rank goes on serving
    assert _outputs(_run(engine, PROMPTS)) == reference and ex.view.active_ranks == (0, 1, 2, 3)
    assert _outputs(_run(engine, PROMPTS, at_step=2, victims=(2,))) == reference
    _rejoin(engine, 2)  # a fresh interpreter (a rejoin waits for nobody's imports); a new server begins its own
    assert _parent(ex.pids()[2]) == os.getpid()
    me = os.getpid()
    [new] = {int(c) for c in Path(f"/proc/{me}/task/{me}/children").read_text().split()} - set(ex.pids())
    assert _outputs(_run(engine, PROMPTS, at_step=2, victims=(3,))) == reference
    _rejoin(engine, 3)
    assert _parent(ex.pids()[3]) == new and _parent(new) == os.getpid()
    assert _outputs(_run(engine, PROMPTS)) == reference


def test_kill_during_repair_and_during_reintegration(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    ex = _executor(engine)
    # a second rank dies while the copies of the first repair are being written
    second = {"victim": 3, "done": False}

    def kill_then_repair(view: MembershipView) -> None:
        if not second["done"]:
            second["done"] = True
            os.kill(ex.pids()[second["victim"]], signal.SIGKILL)

    ex.hooks.before_repair = kill_then_repair
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    for step in range(8):
        if step == 4:
            os.kill(ex.pids()[1], signal.SIGKILL)
        engine.step()
    assert ex.view.states[1] is RankState.FAILED and ex.view.states[3] is RankState.FAILED
    # survivors 0 and 2 have spare slots for one rank's experts only: the rest waits, paused
    assert engine.paused_reason is not None and not any(r.finished for r in reqs)
    _rejoin(engine, 1)
    _rejoin(engine, 3)
    while not all(r.finished for r in reqs):
        engine.step()
    assert _outputs(reqs) == reference

    # a survivor dies at the step boundary where a joiner is switched in
    os.kill(ex.pids()[2], signal.SIGKILL)
    _run(engine, PROMPTS[:4])
    ex.hooks.before_repair = None

    def kill_then_activate(rank: int) -> None:
        os.kill(ex.pids()[0], signal.SIGKILL)

    ex.hooks.before_switch_in = kill_then_activate
    ex.rejoin(2)
    joiner = ex.pool.process(2)
    assert joiner is not None and joiner.conn.poll(60)  # loaded: the next step boundary switches it in
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    deadline = time.monotonic() + 60
    while not all(r.finished for r in reqs):
        assert time.monotonic() < deadline
        engine.step()
    assert _outputs(reqs) == reference
    assert ex.view.states[0] is RankState.FAILED and ex.view.states[2] is RankState.ACTIVE
    ex.hooks.before_switch_in = None
    _rejoin(engine, 0)
    assert _outputs(_run(engine, PROMPTS)) == reference


def test_rejoin_auto_brings_the_rank_back_by_itself(model_dir: Path, reference: list[list[int]]) -> None:
    engine = _instance(model_dir, rejoin="auto")
    try:
        ex = _executor(engine)
        reqs = _run(engine, PROMPTS, at_step=3, victims=(1,))
        assert _outputs(reqs) == reference
        deadline = time.monotonic() + 60
        while ex.view.states[1] is not RankState.ACTIVE:
            assert time.monotonic() < deadline, ex.status()["events"]
            engine.step()
            time.sleep(0.05)
        assert _outputs(_run(engine, PROMPTS)) == reference
    finally:
        engine.close()


def test_redundant_replicas_make_repair_tier1_only(model_dir: Path, reference: list[list[int]]) -> None:
    engine = _instance(model_dir, num_redundant_experts=64)
    try:
        ex = _executor(engine)
        per_rank = ex.placement.num_physical // 4
        phy = ex.placement.physical_to_logical_map
        # a rank every one of whose experts has a replica on another rank
        victim = next(
            r for r in range(4)
            if all(
                any(int(phy[layer, s]) == int(phy[layer, own]) and s // per_rank != r for s in range(phy.shape[1]))
                for layer in range(phy.shape[0]) for own in range(r * per_rank, (r + 1) * per_rank) if phy[layer, own] >= 0
            )
        )
        reqs = _run(engine, PROMPTS, at_step=5, victims=(victim,))
        assert _outputs(reqs) == reference
        repair = ex.repairs[-1]
        assert repair["tier2_experts"] == 0 and repair["bytes_moved"] == 0 and repair["tier1_experts"] > 0
    finally:
        engine.close()


def test_uncoverable_pauses_with_a_reason_until_the_rank_rejoins(model_dir: Path, reference: list[list[int]]) -> None:
    engine = _instance(model_dir, num_spare_slots=0)
    try:
        ex = _executor(engine)
        reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
        for _ in range(3):
            engine.step()
        os.kill(ex.pids()[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while engine.paused_reason is None:
            assert time.monotonic() < deadline
            engine.step()
        assert "no live replica" in engine.paused_reason and ex.coverage()["none"] > 0
        assert ex.status()["paused"] == engine.paused_reason
        assert not any(r.finished for r in reqs)
        _rejoin(engine, 1)
        assert engine.paused_reason is None and ex.coverage()["none"] == 0
        while not all(r.finished for r in reqs):
            engine.step()
        assert _outputs(reqs) == reference
    finally:
        engine.close()


def _until(engine: LLMEngine, done: object, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: {_executor(engine).status()['events'][-8:]}"
        engine.step()
        time.sleep(0.02)


def test_a_pause_that_began_during_a_rejoin_ends_once_the_active_ranks_can_cover(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    """Issue 12's finding 1: rank 2's rejoin starts; while it loads ranks 1 and 0 die (one
    survivor: paused). Rank 2 is switched in (two ranks: still too few slots), then dies while
    the instance is paused (seen without a step), then 0 and 1 rejoin: serving resumes at the
    switch-in after which the active ranks can hold every expert, and every output is exact."""
    ex = _executor(engine)
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    for _ in range(3):
        engine.step()
    os.kill(ex.pids()[2], signal.SIGKILL)
    _until(engine, lambda: ex.view.states[2] is RankState.FAILED, "rank 2 failed")
    ex.rejoin(2)
    os.kill(ex.pids()[1], signal.SIGKILL)
    os.kill(ex.pids()[0], signal.SIGKILL)
    _until(engine, lambda: ex.view.active_ranks == (3,), "ranks 0 and 1 failed")
    assert engine.paused_reason is not None and ex.view.states[2] is RankState.JOINING
    _until(engine, lambda: ex.view.states[2] is RankState.ACTIVE, "rank 2 switched in")
    assert ex.view.active_ranks == (2, 3) and engine.paused_reason is not None  # 44 slots a layer, 64 experts
    os.kill(ex.pids()[2], signal.SIGKILL)  # no step runs while paused: the boundary check must see it
    _until(engine, lambda: ex.view.states[2] is RankState.FAILED, "rank 2 failed while paused", 10.0)
    assert any(e.kind == "fault_seen" and e.rank == 2 and "while paused" in e.detail for e in ex.events)
    _rejoin(engine, 0)
    assert ex.view.active_ranks == (0, 3) and engine.paused_reason is not None
    _rejoin(engine, 1)
    assert ex.view.active_ranks == (0, 1, 3)
    assert engine.paused_reason is None and ex.coverage()["none"] == 0  # 66 slots: every expert again
    assert ex.repairs[-1].get("tier2_experts", 0) > 0  # copied at the switch-in
    _until(engine, lambda: all(r.finished for r in reqs), "requests finished")
    assert _outputs(reqs) == reference
    _rejoin(engine, 2)
    assert all(s is RankState.ACTIVE for s in ex.view.states)
    assert _outputs(_run(engine, PROMPTS)) == reference


def test_degraded_mode_masks_lost_experts_and_renormalises(model_dir: Path) -> None:
    """Opt-in: with too few slots, serve on with the lost experts masked; the router's remaining
    top-k weights are scaled back to their original total (checked numerically on a layer)."""
    from eep.model.loader import load_model
    from eep.placement.routing import without_slots

    model = load_model(str(model_dir), dtype="float32", max_len=64, progress=False)
    layer = model.moe_layers()[0]
    full = model.tables.placement()
    x = torch.randn(16, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ids, weights = layer.router(x)
    lost = int(ids[0, 0])  # an expert token 0 uses
    drop = torch.zeros_like(full.physical_to_logical_map, dtype=torch.bool)
    drop[0] = full.physical_to_logical_map[0] == lost
    model.tables.update_(without_slots(full, drop))
    slots, renormed = layer.route(x)
    gone = ids == lost
    assert bool((slots[gone] == -1).all()) and bool((slots[~gone] >= 0).all())
    assert bool((renormed[gone] == 0).all())
    expected = weights.masked_fill(gone, 0) * (weights.sum(-1, keepdim=True) / weights.masked_fill(gone, 0).sum(-1, keepdim=True))
    torch.testing.assert_close(renormed, expected)
    torch.testing.assert_close(renormed.sum(-1), weights.sum(-1))

    engine = _instance(model_dir, num_spare_slots=0, on_uncoverable="degrade")
    try:
        ex = _executor(engine)
        reqs = _run(engine, PROMPTS, at_step=4, victims=(2,))
        assert all(len(r.output_ids) == MAX_TOKENS for r in reqs)  # served on, with fewer experts
        status = ex.status()
        assert status["degraded"] and status["paused"] is None and status["coverage"]["none"] > 0  # type: ignore[index]
        assert any(e["kind"] == "degraded" for e in status["events"])  # type: ignore[union-attr]
    finally:
        engine.close()


def test_llm_api_reports_membership_coverage_and_events_and_rejoins(model_dir: Path, reference: list[list[int]]) -> None:
    import eep

    with eep.LLM(str(model_dir), dtype="bfloat16", ep_size=2, max_num_seqs=32, max_model_len=96) as llm:
        status = llm.status()
        assert status["view"]["active"] == [0, 1] and status["coverage"]["none"] == 0  # type: ignore[index]
        os.kill(llm.engine.executor.pids()[1], signal.SIGKILL)  # type: ignore[attr-defined]
        outs = llm.generate(PROMPTS, PARAMS)
        assert [o.output_ids for o in outs] == reference
        status = llm.status()
        assert status["view"]["active"] == [0]  # type: ignore[index]
        assert status["view"]["ranks"][1]["state"] == "failed"  # type: ignore[index]
        # started, then the failure (the dead process is reaped at a step boundary once it has exited)
        kinds = [e["kind"] for e in status["events"] if e["kind"] != "reaped"]  # type: ignore[union-attr]
        assert kinds[:5] == ["view_committed", "fault_seen", "view_committed", "repair", "resume"]
        assert all(isinstance(e["time"], float) for e in status["events"])  # type: ignore[union-attr]
        llm.rejoin(1)
        deadline = time.monotonic() + 60
        while llm.status()["view"]["active"] != [0, 1]:  # type: ignore[index]
            assert time.monotonic() < deadline
            llm.generate(PROMPTS[:1], PARAMS[:1])  # steps switch the joiner in once it is ready
        assert [o.output_ids for o in llm.generate(PROMPTS, PARAMS)] == reference


def test_drain_moves_requests_off_a_rank_gracefully_and_it_can_rejoin(engine: LLMEngine, reference: list[list[int]]) -> None:
    ex = _executor(engine)
    proc = ex.pool.process(2)
    assert proc is not None
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    for _ in range(4):
        engine.step()
    ex.drain(2)
    while not all(r.finished for r in reqs):
        engine.step()
    assert _outputs(reqs) == reference
    assert ex.view.states[2] is RankState.FAILED and proc.proc.returncode == 0  # stopped, not killed
    assert any(e.kind == "drained" and e.rank == 2 for e in ex.events)
    _rejoin(engine, 2)
    assert _outputs(_run(engine, PROMPTS)) == reference


@pytest.mark.parametrize("backend", ["shm", "gloo"])
def test_full_restart_relaunches_every_rank_and_loses_no_request(
    model_dir: Path, reference: list[list[int]], backend: str
) -> None:
    """--fault-policy restart: what torchrun --max-restarts gives. On shm it is the fair baseline
    of `eep bench failure` (the fixed-membership fast path, restarted): a survivor blocked on the
    dead peer's data is released by the close (the announced epoch), so the restart does not
    sit out a timeout; gloo is the slower fixed-membership reference."""
    from eep.llm import build_engine

    engine = build_engine(_config(model_dir), EPConfig(ep_size=2, backend=backend, fault_policy="restart"))
    try:
        ex = engine.executor
        assert isinstance(ex, EPExecutor)
        old = ex.pids()
        reqs = _run(engine, PROMPTS, at_step=4, victims=(1,))
        assert _outputs(reqs) == reference
        assert len(engine.restarts) == 1 and engine.restarts[0]["seconds"] > 0
        assert engine.restarts[0]["seconds"] < EPConfig().timeout_s  # no survivor waited out its timeout
        new = _executor(engine).pids()
        assert not set(old) & set(new)  # every process was replaced, survivors too
        assert all(not Path(f"/proc/{pid}").exists() for pid in old)
        assert _outputs(_run(engine, PROMPTS)) == reference  # the relaunched instance serves on
    finally:
        engine.close()


def test_every_view_is_stored_also_those_that_keep_the_epoch(engine: LLMEngine, reference: list[list[int]]) -> None:
    """A joiner that starts loading, and one that dies while it loads, change the view but not
    the epoch: those views reach the membership store too, as every other."""
    ex = _executor(engine)
    assert _outputs(_run(engine, PROMPTS, at_step=3, victims=(1,))) == reference

    def stored() -> dict[str, object]:
        committed = ex.store.current()
        assert committed is not None and committed.epoch == ex.view.epoch
        return committed.record["view"]  # type: ignore[no-any-return]

    assert stored() == ex.view.to_dict()
    epoch = ex.view.epoch
    ex.rejoin(1)
    assert ex.view.epoch == epoch and stored()["ranks"][1]["state"] == "joining"  # type: ignore[index]
    os.kill(ex.pids()[1], signal.SIGKILL)  # the joiner dies while it loads
    deadline = time.monotonic() + 30
    while ex.view.states[1] is not RankState.FAILED:
        assert time.monotonic() < deadline
        engine.step()
        time.sleep(0.05)
    assert ex.view.epoch == epoch and stored() == ex.view.to_dict()
    _rejoin(engine, 1)
    assert stored() == ex.view.to_dict() and _outputs(_run(engine, PROMPTS)) == reference


def test_the_view_names_processes_by_incarnations_of_its_own_not_by_pids(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    """pids of different hosts can be equal: a view naming processes by pid would refuse the
    rejoin of a rank whose new pid another host's rank has. Every process gets a fresh
    incarnation id from the controller instead, and every step's answers are checked against it."""
    ex = _executor(engine)
    seen = set(ex.view.incarnations)
    assert len(seen) == 4 and not seen & set(ex.pids())
    for victim in (2, 2, 0):
        assert _outputs(_run(engine, PROMPTS, at_step=2, victims=(victim,))) == reference
        _rejoin(engine, victim)
        new = ex.view.incarnations[victim]
        assert new not in seen and new == ex.pool[victim].incarnation and new != ex.pids()[victim]
        seen.add(new)
    assert ex.steps_from_fenced == 0


def test_a_reply_of_an_older_epoch_is_dropped_not_taken_for_the_answer(
    engine: LLMEngine, reference: list[list[int]]
) -> None:
    """A rank's pipe holds an answer to an earlier request (of an older epoch) when a step's
    orders go out: the step reads past it by its epoch instead of failing the rank."""
    ex = _executor(engine)
    assert _outputs(_run(engine, PROMPTS, at_step=2, victims=(3,))) == reference
    _rejoin(engine, 3)
    old = ex.view.epoch - 1
    wire.send(ex.pool[0].conn, wire.QueryPtrs(old))  # rank 0 answers Ptrs of the old epoch
    assert ex.pool[0].conn.poll(30)
    before = ex.view
    assert _outputs(_run(engine, PROMPTS)) == reference
    assert ex.view == before and ex.status()["stale_replies_dropped"] == 1

"""The request journal (eep.serving.journal) and what it stands on: a request admitted again
from its committed tokens samples exactly what an uninterrupted run does (greedy and seeded, in
the engine loop, streaming only what follows); event ids parse strictly; finished requests are
kept for their retention and up to a bound, unfinished ones always; a standby's replica ends
equal to the journal whenever it subscribed."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from eep.config import EngineConfig
from eep.engine.engine import LLMEngine
from eep.engine.loop import EngineLoop, TokenEvent
from eep.engine.request import RequestOutput
from eep.engine.sampling import SamplingParams
from eep.errors import RequestError
from eep.model.default_model import init_model
from eep.runtime import wire
from eep.security.channel import Channel
from eep.serving.journal import Choice, Entry, RequestJournal, parse_event_id
from eep.serving.replication import JournalFeed, JournalReplica


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> EngineLoop:
    path = init_model(tmp_path_factory.mktemp("journal") / "m")
    with EngineLoop(LLMEngine(EngineConfig(str(path), dtype="float32", max_model_len=96, max_num_seqs=4))) as lp:
        yield lp  # type: ignore[misc]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_a_request_admitted_again_from_its_committed_tokens_samples_what_an_uninterrupted_run_does(
        loop: EngineLoop, params: SamplingParams) -> None:
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    whole = loop.submit(prompt, params).result(timeout=120)
    for k in (1, 7, 29):
        events: list[TokenEvent] = []
        text = loop.engine.decode(whole.output_ids[:k]) or ""
        out = loop.submit(prompt, params, on_tokens=events.append,
                          resume=(whole.output_ids[:k], text)).result(timeout=120)
        assert out.output_ids == whole.output_ids
        assert [t for ev in events for t in ev.token_ids] == whole.output_ids[k:]  # only what follows
        assert events[-1].finish_reason == whole.finish_reason


def test_committed_tokens_that_leave_nothing_to_do_are_refused(loop: EngineLoop) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0)
    with pytest.raises(RequestError, match="cannot go on"):
        loop.submit([1, 2], params, resume=([5, 6, 7], "")).result(timeout=60)


def test_event_ids_parse_strictly() -> None:
    assert parse_event_id("cmpl-abc:12") == ("cmpl-abc", 12)
    assert parse_event_id("my:own:id:0") == ("my:own:id", 0)  # a request id may hold colons
    for bad in ("", "abc", ":3", "abc:", "abc:-1", "abc:1.5", "abc:1e3", "abc:" + "9" * 10):
        assert parse_event_id(bad) is None, bad


def _finished_entry(rid: str) -> Entry:
    entry = Entry(rid, "completion", "d", 0, [Choice([1], SamplingParams(max_tokens=1, seed=1))])
    entry.on_tokens(0)(TokenEvent((7,), "x", "length"))
    return entry


def test_finished_requests_are_kept_for_their_retention_and_up_to_a_bound() -> None:
    journal = RequestJournal(retention_s=0.3, max_finished=2)
    running = journal.add(Entry("run", "completion", "d", 0, [Choice([1], SamplingParams(max_tokens=4, seed=1))]))
    running.choices[0].future = Future()
    left = journal.add(Entry("left", "completion", "d", 0, [Choice([1], SamplingParams(max_tokens=4, seed=1))]))
    left.choices[0].future = Future()
    left.choices[0].future.add_done_callback(left.on_done(0))
    left.choices[0].future.cancel()  # its client went away and never came back
    assert left.interrupted
    for rid in ("a", "b"):
        journal.add(_finished_entry(rid))
    assert journal.get("left") is None and journal.get("a") is not None  # the oldest ended went first
    assert journal.get("run") is running
    time.sleep(0.4)
    assert journal.get("a") is None and journal.get("b") is None and journal.get("run") is running
    assert journal.add(Entry("run", "chat", "e", 0, [])) is running  # the same id twice: the first entry


def test_a_finished_choice_keeps_its_output_whatever_its_future_does() -> None:
    entry = _finished_entry("x")
    choice = entry.choices[0]
    assert entry.finished and choice.output == RequestOutput("", [1], [7], "length", "x")
    assert not choice.running and not entry.interrupted


def test_a_standby_that_subscribes_while_tokens_are_committed_ends_with_the_same_journal() -> None:
    """The snapshot and the changes after it neither miss nor repeat an event, whenever the
    standby subscribes (real journal, real feed and replica over a real channel)."""
    journal = RequestJournal()
    feed = JournalFeed(journal, lambda: 3, ping_s=0.05)
    entries = [journal.add(Entry(f"r{i}", "completion", "d", 0, [Choice([1, 2], SamplingParams(max_tokens=400,
                                                                                               seed=i))]))
               for i in range(4)]
    steps = 400

    def commit() -> None:  # as the engine loop does, one event per step and request
        for step in range(steps):
            for e in entries:
                e.on_tokens(0)(TokenEvent((step,), f"{step} ", "length" if step == steps - 1 else None))

    writer = threading.Thread(target=commit)
    writer.start()
    time.sleep(0.01)
    ours, theirs = socket.socketpair()
    feed.subscribe(Channel(ours), wire.StandbyHello(0, 1, os.getpid()))
    replica = JournalReplica(RequestJournal())
    conn = Channel(theirs)
    try:
        writer.join(30)
        deadline = time.monotonic() + 30
        while not all((c := replica.journal.get(e.rid)) is not None and c.finished for e in entries):
            assert time.monotonic() < deadline, "the replica never caught up"
            if conn.poll(1.0):
                replica.apply(wire.recv(conn, wire.TO_STANDBY))
        for e in entries:
            copy = replica.journal.get(e.rid)
            assert copy is not None and copy.choices[0].output_ids == list(range(steps))
            assert [ev.end for ev in copy.choices[0].events] == [ev.end for ev in e.choices[0].events]
        assert replica.running() == [] and feed.status()["standbys"][0]["node"] == 1
    finally:
        feed.close()
        conn.close()

"""LLMEngine end to end on the tiny default Qwen3-MoE model (fp32 unless a test says otherwise).

What is checked: a request's tokens depend only on its own prompt and sampling parameters
(not on batch composition, arrival time, chunked prefill or slot pressure); seeded sampling
is reproducible and honours top-k/top-p; stop conditions; bad requests and bad configs fail
with `RequestError` / `ConfigError` and leave the engine usable; text prompts round-trip
through the tokenizer.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eep.config import EngineConfig
from eep.engine.engine import LLMEngine
from eep.engine.request import Request, RequestOutput
from eep.engine.sampling import SamplingParams, sample
from eep.engine.scheduler import Scheduler
from eep.errors import ConfigError, RequestError
from eep.model.default_model import init_model
from eep.tokenizer import EOS_TOKEN_ID, Tokenizer

MAX_LEN = 128
FIRST_ORDINARY_ID = 3  # ids 0..2 are special tokens (0 = eos)
PROMPT_LENS = (3, 7, 12, 18, 25, 31, 36, 40)
MAX_TOKENS = (5, 9, 3, 12, 7, 10, 4, 8)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
STEP_LIMIT = 2_000  # no test here needs more steps; hitting it means the engine stopped making progress
TEST_TIMEOUT_S = 300  # generate() loops until its requests finish: a scheduler bug would hang it


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_ID, 4096) for _ in range(n)]


def _prompts(seed: int, lens: Sequence[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [_prompt(rng, n) for n in lens]


PROMPTS = _prompts(0, PROMPT_LENS)
GREEDY = [SamplingParams(max_tokens=m) for m in MAX_TOKENS]


def _engine(model_dir: Path, **overrides: object) -> LLMEngine:
    kw: dict[str, object] = {"dtype": "float32", "max_num_seqs": 16, "max_model_len": MAX_LEN, "progress": False}
    return LLMEngine(EngineConfig(str(model_dir), **(kw | overrides)))  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging() -> Iterator[None]:
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test still running after {TEST_TIMEOUT_S} s: the engine stopped making progress")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_model(tmp_path_factory.mktemp("m") / "qwen3_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> LLMEngine:
    """Big budget: every prompt prefills in one step."""
    return _engine(model_dir)


@pytest.fixture(scope="module")
def small_engine(model_dir: Path) -> LLMEngine:
    """4 slots and 16 tokens per step: long prompts prefill in chunks, requests wait for slots."""
    return _engine(model_dir, max_num_seqs=4, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def solo(engine: LLMEngine) -> list[list[int]]:
    """Greedy output ids of each of PROMPTS run alone."""
    return [engine.generate([p], sp)[0].output_ids for p, sp in zip(PROMPTS, GREEDY)]


def _ids(outputs: Sequence[RequestOutput]) -> list[list[int]]:
    return [o.output_ids for o in outputs]


def _run_until_idle(engine: LLMEngine, arrivals: Sequence[Sequence[tuple[list[int], SamplingParams]]]) -> list[Request]:
    """Step `engine`, adding `arrivals[k]` before step k, until all is done; return every request added."""
    added: list[Request] = []
    for k in range(STEP_LIMIT):
        for prompt, params in arrivals[k] if k < len(arrivals) else ():
            added.append(engine.add_request(prompt, params))
        if k >= len(arrivals) and not engine.has_work():
            assert all(r.finished for r in added)
            return added
        engine.step()
    pytest.fail(f"engine still busy after {STEP_LIMIT} steps")


def _record_logits(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every step's sampled-row logits `[N, V]` of `engine`, in step order (steps sampling nothing skipped)."""
    seen: list[torch.Tensor] = []
    worker = engine.executor.worker  # type: ignore[attr-defined]
    forward = worker.forward_logits

    def recording(work):  # type: ignore[no-untyped-def]
        logits = forward(work)
        if logits.shape[0]:
            seen.append(logits.clone())
        return logits

    monkeypatch.setattr(worker, "forward_logits", recording)
    return seen


def _record_steps(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Per step: (tokens scheduled, requests left waiting for a slot)."""
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording(admit: bool = True, others_decode: bool = False):  # type: ignore[no-untyped-def]
        plan = schedule(admit, others_decode)
        steps.append((sum(s.q_len for s in plan), len(engine.scheduler.waiting)))
        return plan

    monkeypatch.setattr(engine.scheduler, "schedule", recording)
    return steps


def _model_copy(model_dir: Path, dest: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(model_dir, dest)
    edit(dest)
    return dest


# -- 1. batching invariance -------------------------------------------------------------------
def test_solo_outputs_have_the_requested_lengths(solo: list[list[int]]) -> None:
    # guards the references the invariance tests compare against (eos, id 0, would end one early)
    assert all(len(o) == m or (len(o) < m and o[-1] == EOS_TOKEN_ID) for o, m in zip(solo, MAX_TOKENS))
    assert len({tuple(o) for o in solo}) == len(solo)


def test_greedy_batch_equals_solo(engine: LLMEngine, solo: list[list[int]]) -> None:
    assert _ids(engine.generate(PROMPTS, GREEDY)) == solo
    assert _ids(engine.generate(PROMPTS[::-1], GREEDY[::-1])) == solo[::-1]


def test_greedy_with_interleaved_arrivals_chunked_prefill_and_waiting(
    small_engine: LLMEngine, solo: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _record_steps(small_engine, monkeypatch)
    others = _prompts(7, (29, 2, 45, 11, 60))
    other_params = [
        SamplingParams(max_tokens=6, temperature=1.0, seed=5),
        SamplingParams(max_tokens=15),
        SamplingParams(max_tokens=3, temperature=0.7, top_k=20, seed=9),
        SamplingParams(max_tokens=9, ignore_eos=True),
        SamplingParams(max_tokens=2),
    ]
    # targets and unrelated requests arrive one per step, with an arrival-free step now and then
    mixed = [(p, sp, True) for p, sp in zip(PROMPTS, GREEDY)]
    for i, item in enumerate(zip(others, other_params)):
        mixed.insert(2 * i, (*item, False))
    schedule: list[list[tuple[list[int], SamplingParams]]] = []
    for k, (p, sp, _) in enumerate(mixed):
        schedule += [[(p, sp)]] if k % 3 else [[], [(p, sp)]]
    reqs = _run_until_idle(small_engine, schedule)
    targets = [r for r, (_, _, is_target) in zip(reqs, mixed) if is_target]
    assert [r.output_ids for r in targets] == solo
    assert max(n for n, _ in steps) == 16  # the budget was the limit: long prompts were chunked
    assert max(w for _, w in steps) > 0  # and requests queued for slots


# -- 2. chunked prefill -----------------------------------------------------------------------
def test_prefill_is_chunked_only_while_others_decode_and_a_replay_admits_nothing() -> None:
    """Scheduler alone (CPU bookkeeping): a prompt with nothing decoding beside it prefills at
    once; beside a decoding request it takes at most max_prefill_tokens per step; a replayed
    step (`admit=False`) leaves waiting requests waiting."""
    s = Scheduler(num_slots=4, max_batched_tokens=64, max_prefill_tokens=8)
    a = Request("a", list(range(3, 13)), SamplingParams(), 0)
    s.add(a)
    assert [(x.request.request_id, x.q_len) for x in s.schedule()] == [("a", 10)]
    a.num_computed, a.output_ids = 10, [5]  # its first token committed: it decodes from now on
    b = Request("b", list(range(3, 23)), SamplingParams(), 0)
    s.add(b)
    assert [(x.request.request_id, x.q_len) for x in s.schedule(admit=False)] == [("a", 1)]
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        assert plan[0].request is a and plan[0].q_len == 1
        chunks.append(plan[1].q_len)
        a.num_computed += 1
        a.output_ids.append(5)
        b.num_computed += plan[1].q_len
    assert chunks == [8, 8, 4]


def test_a_rank_that_decodes_nothing_chunks_while_another_rank_decodes() -> None:
    """The ranks of one step run in lock step: a rank just switched in and handed a queue of
    waiting requests (it decodes nothing itself) must not prefill them all in one step while
    another rank's streams wait for it; with no rank decoding it prefills at once."""
    busy, fresh = (Scheduler(num_slots=4, max_batched_tokens=64, max_prefill_tokens=8) for _ in range(2))
    a = Request("a", list(range(3, 13)), SamplingParams(), 0)
    busy.add(a)
    busy.schedule()
    a.num_computed, a.output_ids = 10, [5]
    for i in range(3):
        fresh.add(Request(f"w{i}", list(range(3, 23)), SamplingParams(), 0))
    assert busy.decoding() and not fresh.decoding()
    assert sum(x.q_len for x in fresh.schedule(others_decode=True)) == 8
    idle = Scheduler(num_slots=4, max_batched_tokens=64, max_prefill_tokens=8)
    for i in range(3):
        idle.add(Request(f"v{i}", list(range(3, 23)), SamplingParams(), 0))
    assert sum(x.q_len for x in idle.schedule(others_decode=False)) == 60


@pytest.mark.parametrize("prompt_len", [33, 100])  # 33 = 2 chunks of 16 + a 1-token chunk
def test_chunked_prefill_equals_one_shot_prefill(
    engine: LLMEngine, small_engine: LLMEngine, prompt_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _prompts(prompt_len, (prompt_len,))[0]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    whole, chunked = _record_logits(engine, monkeypatch), _record_logits(small_engine, monkeypatch)
    steps = _record_steps(small_engine, monkeypatch)
    a = engine.generate([prompt], params)[0]
    b = small_engine.generate([prompt], params)[0]
    assert [n for n, _ in steps[: prompt_len // 16]] == [16] * (prompt_len // 16)  # it really was chunked
    assert b.output_ids == a.output_ids
    assert len(whole) == len(chunked) == params.max_tokens
    # Attention is row-invariant, but fp32 linear layers are not quite: MKL takes a gemv path
    # for 1-3 rows, which rounds differently (~1e-7). bf16 linears are (see the re-prefill test).
    torch.testing.assert_close(torch.cat(chunked), torch.cat(whole), rtol=1e-5, atol=1e-5)


def test_bf16_reprefill_of_committed_tokens_continues_bit_exactly(model_dir: Path) -> None:
    """What failure recovery relies on: a request re-prefilled from its prompt + committed
    tokens (on another rank, in another batch) continues with exactly the tokens it would have
    produced by decoding on. bf16, where any difference in rounding shows up as other tokens."""
    bf16 = _engine(model_dir, dtype="bfloat16")
    prompts = _prompts(7, (9, 17, 33, 48, 5, 26))
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = bf16.generate(prompts, greedy)
    rng = random.Random(1)
    cuts = [rng.randrange(1, 24) for _ in prompts]
    resumed = bf16.generate(
        [p + r.output_ids[:k] for p, r, k in zip(prompts, ref, cuts)],
        [SamplingParams(max_tokens=24 - k, ignore_eos=True) for k in cuts],
    )
    assert [r.output_ids[k:] for r, k in zip(ref, cuts)] == _ids(resumed)


def test_bf16_request_reprefilled_while_others_decode_continues_bit_exactly(model_dir: Path) -> None:
    """Failure recovery mid-run, in one process: half the requests lose their KV cache (as if
    their rank died) and are prefilled again while the others go on decoding. Found by a kill
    under 16 HTTP streams: with decode rows padded to the batch's longest sequence, request 9
    came back with another token 8 for every eviction step 3..8 (the reduction length changed
    the rounding); each row now attends over its own span of keys."""
    bf16 = _engine(model_dir, dtype="bfloat16", max_model_len=128)
    assert bf16.tokenizer is not None
    prompts = [bf16.tokenizer.encode(f"Request number {i} asks about expert parallelism") for i in range(16)]
    greedy = SamplingParams(max_tokens=24)
    alone = [bf16.generate([p], greedy)[0].output_ids for p in prompts]
    scheduler = bf16.schedulers[0]
    for at in (3, 6):
        reqs = [bf16.add_request(p, greedy) for p in prompts]
        step = 0
        while not all(r.finished for r in reqs):
            if step == at:  # evict 8..15 as _readmit_orphans does: slots freed, cache lost, output kept
                moved = [r for r in reqs[8:] if not r.finished]
                for r in moved:
                    if r in scheduler.running:
                        scheduler.running.remove(r)
                        scheduler.free_slots.append(r.slot)
                    else:
                        scheduler.waiting.remove(r)
                    r.slot, r.num_computed = None, 0
                scheduler.waiting.extendleft(reversed(moved))
            bf16.step()
            step += 1
        assert [r.output_ids for r in reqs] == alone, f"evicted at step {at}"


# -- 3. seeded sampling -----------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_batch_independent(
    engine: LLMEngine, small_engine: LLMEngine
) -> None:
    prompt = PROMPTS[2]
    first = engine.generate([prompt], SEEDED)[0].output_ids
    assert engine.generate([prompt], SEEDED)[0].output_ids == first
    crowd = [SamplingParams(max_tokens=7, temperature=0.8, seed=s) for s in range(3)] + GREEDY[:3]
    batch = engine.generate([prompt, *PROMPTS[2:8]], [SEEDED, *crowd])
    assert batch[0].output_ids == first
    late = _run_until_idle(small_engine, [[(p, sp)] for p, sp in zip(PROMPTS[3:], crowd)] + [[(prompt, SEEDED)]])
    assert late[-1].output_ids == first
    assert len(first) == SEEDED.max_tokens


def test_different_seeds_give_different_samples(engine: LLMEngine) -> None:
    prompt = PROMPTS[2]
    seeds = (123, 124, 125, 7)
    outs = _ids(engine.generate([prompt] * len(seeds), [replace(SEEDED, seed=s) for s in seeds]))
    assert len({tuple(o) for o in outs}) == len(seeds)
    # sampling really departs from greedy on this model
    greedy = engine.generate([prompt], SamplingParams(max_tokens=SEEDED.max_tokens, ignore_eos=True))[0]
    assert all(o != greedy.output_ids for o in outs)


def test_top_k_1_is_greedy(engine: LLMEngine, solo: list[list[int]]) -> None:
    params = [SamplingParams(max_tokens=m, temperature=0.8, top_k=1, seed=i) for i, m in enumerate(MAX_TOKENS)]
    assert _ids(engine.generate(PROMPTS, params)) == solo


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.3), (50, 0.5)])
def test_samples_lie_in_the_top_k_top_p_set(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch, top_k: int, top_p: float
) -> None:
    logits = _record_logits(engine, monkeypatch)
    params = SamplingParams(max_tokens=16, temperature=1.5, top_k=top_k, top_p=top_p, seed=3, ignore_eos=True)
    out = engine.generate([PROMPTS[4]], params)[0].output_ids
    assert len(logits) == len(out)
    for row, tok in zip(logits, out):
        # the reference rule, done independently: top-k first, then top-p on the renormalized rest
        probs, order = torch.softmax(row[0] / params.temperature, dim=-1).sort(descending=True)
        if top_k:
            probs, order = probs[:top_k] / probs[:top_k].sum(), order[:top_k]
        assert tok in order.tolist(), f"{tok} is outside the top {top_k}"
        rank = order.tolist().index(tok)
        assert float(probs[:rank].sum()) < top_p + 1e-6, f"{tok} is outside the top-p {top_p} nucleus"
    assert len(set(out)) > 1  # it sampled, not just argmax


# -- 4. stop conditions -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fresh_at_3(engine: LLMEngine) -> tuple[list[int], list[int]]:
    """A prompt whose greedy output's token 3 appears there first (and is not eos): (prompt, output)."""
    candidates = _prompts(11, [5 + i for i in range(24)])
    outs = engine.generate(candidates, SamplingParams(max_tokens=10, ignore_eos=True))
    for prompt, out in zip(candidates, outs):
        ids = out.output_ids
        if ids[3] not in ids[:3] and ids[3] != EOS_TOKEN_ID:
            return prompt, ids
    pytest.fail("no candidate prompt has a fresh greedy token at position 3; add candidates")


@pytest.mark.parametrize("max_tokens", [1, 2, 13])
def test_max_tokens_ends_with_length(engine: LLMEngine, max_tokens: int) -> None:
    out = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert [len(o.output_ids) for o in out] == [max_tokens] * 3
    assert {o.finish_reason for o in out} == {"length"}


def test_stop_token_ends_the_output_with_stop(engine: LLMEngine, fresh_at_3: tuple[list[int], list[int]]) -> None:
    prompt, greedy = fresh_at_3
    out = engine.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=(greedy[3],)))[0]
    assert out.output_ids == greedy[:4]
    assert out.finish_reason == "stop"


def test_eos_from_config_stops_unless_ignore_eos(
    model_dir: Path, tmp_path: Path, fresh_at_3: tuple[list[int], list[int]]
) -> None:
    prompt, greedy = fresh_at_3

    def make_eos(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg | {"eos_token_id": greedy[3]}))

    eng = _engine(_model_copy(model_dir, tmp_path / "eos", make_eos), max_num_seqs=2)
    stopped = eng.generate([prompt], SamplingParams(max_tokens=10))[0]
    assert (stopped.output_ids, stopped.finish_reason) == (greedy[:4], "stop")
    ignored = eng.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert (ignored.output_ids, ignored.finish_reason) == (greedy, "length")


def test_request_filling_max_model_len_runs_to_the_end(model_dir: Path) -> None:
    eng = _engine(model_dir, max_num_seqs=1, max_model_len=12)
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=5, ignore_eos=True))[0]  # 7 + 5 = 12
    assert (len(out.output_ids), out.finish_reason) == (5, "length")


# -- 5. errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], SamplingParams(), "empty"),
        ("", SamplingParams(), "empty"),
        (
            [5] * 100,
            SamplingParams(max_tokens=29),
            r"prompt \(100 tokens\) \+ max_tokens \(29\) exceeds max_model_len \(128\)",
        ),
        ([5, 4096], SamplingParams(), r"\[0, 4096\)"),
        ([-1, 5], SamplingParams(), r"\[0, 4096\)"),
    ],
    ids=["empty-ids", "empty-text", "too-long", "id-past-vocab", "negative-id"],
)
def test_bad_request_is_rejected_and_leaves_no_trace(
    engine: LLMEngine, prompt: list[int] | str, params: SamplingParams, match: str
) -> None:
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_work()
    assert len(engine.scheduler.free_slots) == engine.config.max_num_seqs


def test_longest_allowed_request_is_accepted(engine: LLMEngine) -> None:
    out = engine.generate([[5] * 100], SamplingParams(max_tokens=28, ignore_eos=True))[0]
    assert len(out.output_ids) == 28


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_params_raise(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_generate_with_mismatched_params_raises(engine: LLMEngine) -> None:
    with pytest.raises(RequestError, match="2 prompts but 3"):
        engine.generate(PROMPTS[:2], GREEDY[:3])
    assert not engine.has_work()


def test_text_prompt_without_tokenizer_raises(model_dir: Path, tmp_path: Path) -> None:
    d = _model_copy(model_dir, tmp_path / "notok", lambda d: (d / "tokenizer.json").unlink())
    eng = _engine(d, max_num_seqs=1)
    with pytest.raises(RequestError, match="tokenizer.json"):
        eng.add_request("Hello", SamplingParams())
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2))[0]  # ids still work, no text
    assert len(out.output_ids) == 2 and out.text is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"max_num_seqs": 8, "max_num_batched_tokens": 4}, "max_num_batched_tokens"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
    ],
)
def test_bad_engine_config_raises(model_dir: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EngineConfig(str(model_dir), **kwargs)  # type: ignore[arg-type]


def test_tiny_temperature_is_rejected_or_samples_greedily(model_dir: Path, engine: LLMEngine) -> None:
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_ids
    try:
        params = SamplingParams(max_tokens=4, temperature=1e-39, seed=1, ignore_eos=True)
    except RequestError:
        return
    eng = _engine(model_dir, max_num_seqs=2)  # a private engine: the failure leaves the engine stuck
    assert eng.generate([PROMPTS[0]], params)[0].output_ids == greedy


# -- 6. bf16 ----------------------------------------------------------------------------------
def test_bf16_engine_runs_and_agrees_loosely_with_fp32(
    model_dir: Path, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf16 = _engine(model_dir, dtype="bfloat16", max_num_seqs=4)
    assert bf16.model.dtype == torch.bfloat16
    assert _engine(model_dir, dtype="auto", max_num_seqs=1).model.dtype == torch.bfloat16  # bf16 on disk
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in MAX_TOKENS[:4]]
    low = bf16.generate(PROMPTS[:4], params)
    assert [len(o.output_ids) for o in low] == list(MAX_TOKENS[:4])
    assert all(0 <= t < 4096 for o in low for t in o.output_ids)
    # first tokens must agree where fp32 is not near a tie: the prompt with the widest top-2 gap
    logits = _record_logits(engine, monkeypatch)
    full = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=1))
    top2 = logits[0].topk(2, dim=-1).values  # [4, 2]: the one prefill step samples all four
    widest = int((top2[:, 0] - top2[:, 1]).argmax())
    assert float(top2[widest, 0] - top2[widest, 1]) > 0.05  # else bf16 rounding could flip it
    assert low[widest].output_ids[0] == full[widest].output_ids[0]


# -- 7. text prompts --------------------------------------------------------------------------
def test_text_prompt_returns_decoded_text(engine: LLMEngine, model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    out = engine.generate(["Hello world"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert out.prompt_ids == tok.encode("Hello world")
    assert isinstance(out.text, str) and out.text
    assert out.text == tok.decode(out.output_ids)
    by_ids = engine.generate([tok.encode("Hello world")], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert by_ids.output_ids == out.output_ids


def test_generate_with_a_bare_string_is_one_request_or_an_error(engine: LLMEngine) -> None:
    try:
        out = engine.generate("Hello world", SamplingParams(max_tokens=2))  # type: ignore[arg-type]
    except RequestError:
        return
    assert len(out) == 1


# -- 8. scheduler -----------------------------------------------------------------------------
def test_more_requests_than_slots_all_finish_as_if_alone(model_dir: Path, engine: LLMEngine) -> None:
    prompts = _prompts(21, (4, 30, 9, 17, 2, 25, 6, 12, 40, 8))
    params = [SamplingParams(max_tokens=3 + i % 5) for i in range(10)]
    alone = [engine.generate([p], sp)[0].output_ids for p, sp in zip(prompts, params)]
    eng = _engine(model_dir, max_num_seqs=3, max_num_batched_tokens=24)
    reqs = [eng.add_request(p, sp, request_id=f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))]
    finished: list[str] = []
    for _ in range(STEP_LIMIT):
        if not eng.has_work():
            break
        finished += [r.request_id for r in eng.step()]
        assert len(eng.scheduler.running) <= 3
    assert sorted(finished) == sorted(r.request_id for r in reqs)  # each reported exactly once
    assert [r.output_ids for r in reqs] == alone
    assert all(r.slot is None for r in reqs) and sorted(eng.scheduler.free_slots) == [0, 1, 2]


@pytest.mark.parametrize(("temperature", "top_p"), [(5e-324, 1.0), (1.0, 5e-324), (5e-324, 5e-324)])
def test_a_temperature_or_top_p_float32_rounds_to_zero_samples_greedily(temperature: float, top_p: float) -> None:
    """Found by schemathesis over HTTP: either made the sampler's distribution empty or NaN, the
    step failed and the engine stopped for every client. Their limit is greedy."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=1)] * 3
    assert sample(logits, params, [1, 2, 3], [0, 0, 0]) == logits.argmax(-1).tolist()


def test_a_lone_surrogate_in_a_text_prompt_fails_that_request_only(engine: LLMEngine) -> None:
    """JSON's "\\ud800" reaches the engine as a lone surrogate; the tokenizer cannot encode it."""
    with pytest.raises(RequestError, match="Unicode"):
        engine.add_request("bad \ud800 text", SamplingParams(max_tokens=2))
    assert engine.generate(["fine"], SamplingParams(max_tokens=2))[0].finish_reason

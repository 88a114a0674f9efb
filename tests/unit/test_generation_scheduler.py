"""The continuous-batching decision, pure: running sequences first (decode tokens and prompt
chunks), blocks as sequences grow, preemption of the newest when blocks run out, and first come
first served admission within the step's token budget and the cache's blocks."""

from __future__ import annotations

import pytest

from router_service.generation.scheduler import Scheduled, SchedulerConfig, SeqState, schedule

CFG = SchedulerConfig(max_num_seqs=4, max_batch_tokens=64, prefill_chunk_tokens=16, block_size=4)


def decoding(seq_id: int, tokens: int) -> SeqState:
    """A sequence that has computed all but its last sampled token, with the blocks for them."""
    return SeqState(seq_id, tokens, tokens - 1, CFG.blocks_for(tokens - 1))


def test_a_new_prompt_is_read_in_chunks():
    plan = schedule([], [SeqState(1, 40)], free_blocks=100, config=CFG)

    assert plan.admitted == (1,) and plan.preempted == ()
    assert plan.scheduled == (Scheduled(1, 16, 4, samples=False),)


def test_the_last_chunk_samples():
    plan = schedule([SeqState(1, 40, computed=32, blocks=8)], [], free_blocks=100, config=CFG)

    assert plan.scheduled == (Scheduled(1, 8, 2, samples=True),)


def test_decodes_get_a_block_only_when_they_cross_into_it():
    plan = schedule([decoding(1, 9), decoding(2, 10)], [], free_blocks=100, config=CFG)

    # seq 1 has 8 tokens cached in 2 blocks: its 9th goes into a third; seq 2's 10th fits in its third
    assert plan.scheduled == (Scheduled(1, 1, 1, True), Scheduled(2, 1, 0, True))


def test_running_sequences_come_before_new_ones_and_share_the_token_budget():
    config = SchedulerConfig(max_num_seqs=8, max_batch_tokens=20, prefill_chunk_tokens=16, block_size=4)
    running = [decoding(1, 5), SeqState(2, 30, computed=16, blocks=4)]

    plan = schedule(running, [SeqState(3, 30), SeqState(4, 3)], free_blocks=100, config=config)

    assert [(s.seq_id, s.tokens) for s in plan.scheduled] == [(1, 1), (2, 14), (3, 5)]
    assert plan.admitted == (3,), "the budget ran out before the last waiting request"
    assert plan.tokens == 20


def test_admission_is_first_come_first_served_and_keeps_headroom():
    running = [decoding(1, 5), decoding(2, 5)]
    # 3 free blocks: seq 3's first chunk needs 4; seq 4 would fit but may not jump the queue
    plan = schedule(running, [SeqState(3, 16), SeqState(4, 2)], free_blocks=3, config=CFG)

    assert plan.admitted == () and [s.seq_id for s in plan.scheduled] == [1, 2]


def test_max_num_seqs_bounds_the_running_set():
    running = [decoding(i, 5) for i in range(1, 4)]

    plan = schedule(running, [SeqState(10, 4), SeqState(11, 4)], free_blocks=100, config=CFG)

    assert plan.admitted == (10,)


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted():
    # each decode crosses into a new block; one block free: seq 1 takes it, seq 3 (newest) goes
    running = [decoding(1, 9), decoding(2, 13), decoding(3, 17)]

    plan = schedule(running, [SeqState(9, 4)], free_blocks=1, config=CFG)

    assert plan.preempted == (3,)
    assert [s.seq_id for s in plan.scheduled] == [1, 2], "seq 3's 4 blocks went to seq 2"
    assert plan.admitted == (), "a step with a preemption admits nobody"


def test_a_sequence_may_have_to_preempt_itself():
    plan = schedule([decoding(1, 9)], [], free_blocks=0, config=CFG)

    assert plan.preempted == (1,) and plan.scheduled == ()


def test_preempted_sequences_wait_oldest_first():
    running = [decoding(1, 9), decoding(2, 5), decoding(3, 5)]

    plan = schedule(running, [], free_blocks=0, config=CFG)

    assert plan.preempted == (2, 3) and [s.seq_id for s in plan.scheduled] == [1]


@pytest.mark.parametrize("name", ["max_num_seqs", "max_batch_tokens", "prefill_chunk_tokens", "block_size"])
def test_config_refuses_zero(name):
    values = {"max_num_seqs": 1, "max_batch_tokens": 1, "prefill_chunk_tokens": 1, "block_size": 1, name: 0}
    with pytest.raises(ValueError, match=name):
        SchedulerConfig(**values)


def test_blocks_never_exceed_what_is_free_and_tokens_never_exceed_the_budget():
    import random

    rng = random.Random(0)
    for _ in range(300):
        config = SchedulerConfig(rng.randint(1, 6), rng.randint(1, 40), rng.randint(1, 16), rng.randint(1, 8))
        running = []
        for i in range(rng.randint(0, 6)):
            tokens = rng.randint(1, 60)
            computed = rng.randint(0, tokens - 1)
            running.append(SeqState(i, tokens, computed, config.blocks_for(computed)))
        waiting = [SeqState(100 + i, rng.randint(1, 60)) for i in range(rng.randint(0, 4))]
        free = rng.randint(0, 20)

        plan = schedule(running, waiting, free, config)

        freed = sum(s.blocks for s in running if s.seq_id in plan.preempted)
        assert sum(s.new_blocks for s in plan.scheduled) <= free + freed
        assert plan.tokens <= config.max_batch_tokens
        ids = [s.seq_id for s in plan.scheduled]
        assert len(ids) == len(set(ids)) and not set(ids) & set(plan.preempted)
        assert len(running) - len(plan.preempted) + len(plan.admitted) <= max(config.max_num_seqs, len(running))

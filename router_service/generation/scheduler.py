"""The continuous-batching decision: which sequences run the next step, with how many tokens,
and how many KV-cache blocks each needs. Pure: counts in, a plan out; the engine acts on it.

Every step (one forward pass of the model over a flat batch of tokens):
1. **Running sequences first, oldest first.** A decoding sequence computes its one new token; a
   sequence still reading its prompt computes its next chunk (at most `prefill_chunk_tokens`).
   Long prompts are read in chunks mixed with the decode steps of the others, so a long prompt
   never stalls everyone's next token.
2. **Blocks as sequences grow.** A sequence gets a new block only when its tokens cross into
   it. When none is free, the most recently admitted running sequence is preempted: its blocks
   are freed and it goes back to the head of the queue, to be computed again later (its tokens
   so far are kept). A step with a preemption admits nobody.
3. **Admission, first come first served**, while the step has tokens left, fewer than
   `max_num_seqs` run, and the blocks for the first chunk are free with one block of headroom
   per running sequence (their next decode steps). A request that does not fit waits, and so
   does everyone behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """max_num_seqs: sequences running at once; max_batch_tokens: tokens one step computes;
    prefill_chunk_tokens: prompt tokens one sequence reads per step; block_size: tokens per
    KV-cache block."""

    max_num_seqs: int
    max_batch_tokens: int
    prefill_chunk_tokens: int
    block_size: int

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batch_tokens", "prefill_chunk_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(frozen=True)
class SeqState:
    """A sequence as the scheduler sees it: tokens: its prompt plus the tokens generated so far;
    computed: of those, the ones whose keys and values are in the cache; blocks: blocks it holds."""

    seq_id: int
    tokens: int
    computed: int = 0
    blocks: int = 0

    @property
    def pending(self) -> int:
        """Tokens to compute before it can sample again (1 while decoding)."""
        return self.tokens - self.computed


@dataclass(frozen=True)
class Scheduled:
    """seq_id computes `tokens` new tokens this step and needs `new_blocks` more blocks first;
    samples: the step ends its pending tokens, so it samples a token."""

    seq_id: int
    tokens: int
    new_blocks: int
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    """scheduled: in batch order; admitted: waiting sequences that start running (in the order
    they were waiting); preempted: running sequences sent back to the queue's head, in the
    order they should wait."""

    scheduled: tuple[Scheduled, ...]
    admitted: tuple[int, ...] = ()
    preempted: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.scheduled)


def schedule(running: Sequence[SeqState], waiting: Sequence[SeqState], free_blocks: int,
             config: SchedulerConfig) -> StepPlan:
    """The next step's plan. running: in admission order (oldest first); waiting: in queue order."""
    budget, free = config.max_batch_tokens, free_blocks
    active = list(running)
    scheduled: list[Scheduled] = []
    preempted: list[int] = []
    i = 0
    while i < len(active) and budget > 0:
        seq = active[i]
        tokens = min(seq.pending, budget, config.prefill_chunk_tokens)
        need = config.blocks_for(seq.computed + tokens) - seq.blocks
        while need > free and len(active) > i:
            victim = active.pop()  # the most recently admitted: it loses the least work
            preempted.append(victim.seq_id)
            if victim is seq:
                break
            free += victim.blocks
        if seq not in active:
            break
        if tokens > 0:
            scheduled.append(Scheduled(seq.seq_id, tokens, need, seq.computed + tokens == seq.tokens))
            free -= need
            budget -= tokens
        i += 1
    admitted: list[int] = []
    if not preempted:
        headroom = len(active)  # one block for each running sequence's next decode steps
        for seq in waiting:
            if len(active) + len(admitted) >= config.max_num_seqs or budget <= 0:
                break
            tokens = min(seq.pending, budget, config.prefill_chunk_tokens)
            need = config.blocks_for(seq.computed + tokens) - seq.blocks
            if need + headroom > free:
                break
            admitted.append(seq.seq_id)
            scheduled.append(Scheduled(seq.seq_id, tokens, need, seq.computed + tokens == seq.tokens))
            free -= need
            budget -= tokens
            headroom += 1
    return StepPlan(tuple(scheduled), tuple(admitted), tuple(reversed(preempted)))


def split_microbatches(scheduled: Sequence[Scheduled], parts: int) -> list[tuple[Scheduled, ...]]:
    """Cut a step's batch into at most `parts` micro-batches of whole sequences, in batch order,
    with tokens as even as the sequences allow (for pipelining: while one micro-batch is at the
    experts, the next runs its attention). Fewer sequences than parts: one per sequence."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    parts = min(parts, len(scheduled))
    if parts <= 1:
        return [tuple(scheduled)] if scheduled else []
    total = sum(s.tokens for s in scheduled)
    out, start, seen = [], 0, 0
    for i, item in enumerate(scheduled):
        cut = total * (len(out) + 1) / parts  # where the next micro-batch should end
        left_after = len(scheduled) - i - 1  # sequences after this one
        # end the micro-batch at the sequence whose end lands closest to the cut, and keep at
        # least one sequence for each micro-batch still to come
        closer = abs(seen + item.tokens - cut) <= abs(seen - cut) or i == start
        if len(out) < parts - 1 and (not closer or left_after < parts - 1 - len(out)) and i > start:
            out.append(tuple(scheduled[start:i]))
            start = i
        seen += item.tokens
    out.append(tuple(scheduled[start:]))
    return out

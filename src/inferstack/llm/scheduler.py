"""Iteration-level scheduling over a fixed pool of KV-cache slots.

Every engine step asks :meth:`IterationScheduler.schedule` what to run:

* every running sequence whose prompt is in the cache decodes one token;
* the rest of the step's token budget (``max_num_batched_tokens``) goes to
  prompts — first those already being prefilled in chunks, then waiting
  requests, first come first served, each taking a free slot.

A request that arrives while others decode joins at the next step; one that
finishes frees its slot at once. ``policy="static"`` is the classic
alternative kept for comparison (benchmarks): a new batch starts only once
every sequence of the previous one has finished.

Not thread-safe: the engine thread owns it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inferstack.llm.runner import Row


@dataclass(slots=True)
class Plan:
    """One step's work: decode rows and prefill rows (chunks), with their sequences."""

    decode: list[Any] = field(default_factory=list)
    prefill: list[tuple[Any, int]] = field(default_factory=list)  # (sequence, chunk length)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class IterationScheduler:
    """Waiting queue, running set and the slot pool."""

    def __init__(self, slots: int, max_num_batched_tokens: int, policy: str = "continuous") -> None:
        self.num_slots = slots
        self.free_slots: list[int] = list(range(slots - 1, -1, -1))
        self.max_num_batched_tokens = max(max_num_batched_tokens, slots)
        self.policy = policy
        self.waiting: deque[Any] = deque()
        #: Sequences holding a slot: prefilling (prompt not fully cached) or decoding.
        self.running: list[Any] = []

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - len(self.free_slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, sequence: Any) -> None:
        self.waiting.append(sequence)

    def remove(self, sequence: Any) -> None:
        """Take a sequence out wherever it is and free its slot (finished, aborted, expired)."""
        if sequence.slot is not None:
            self.free_slots.append(sequence.slot)
            sequence.slot = None
            try:
                self.running.remove(sequence)
            except ValueError:
                pass
        else:
            try:
                self.waiting.remove(sequence)
            except ValueError:
                pass

    def schedule(self) -> Plan:
        plan = Plan()
        if self.policy == "continuous":
            # Admit as many waiting requests as there are slots; their prompts get
            # the token budget below in arrival order (chunked when it runs out).
            admit = True
        else:  # static: a whole new batch, only once the previous one is done
            admit = not self.running
        while admit and self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            sequence.slot = self.free_slots.pop()
            self.running.append(sequence)
        budget = self.max_num_batched_tokens
        for sequence in self.running:
            if sequence.prefilled:
                plan.decode.append(sequence)
        budget -= len(plan.decode)
        for sequence in self.running:
            if budget <= 0:
                break
            if not sequence.prefilled:
                chunk = min(len(sequence.prompt_ids) - sequence.cached, budget)
                plan.prefill.append((sequence, chunk))
                budget -= chunk
        return plan

    @staticmethod
    def decode_rows(plan: Plan) -> list[Row]:
        return [Row(s.slot, s.cached, [s.last_token]) for s in plan.decode]

    @staticmethod
    def prefill_rows(plan: Plan) -> list[Row]:
        return [Row(s.slot, s.cached, s.prompt_ids[s.cached:s.cached + n]) for s, n in plan.prefill]

"""Stage 0's request journal: admission, continuous batching and replay — pure data.

Every generation request in flight is recorded here with its prompt and the tokens produced so
far. The lockstep adapter asks, for the slot the schedule gives stage 0 at a tick, what to feed:

* a slot whose sampled token came back round the ring is fed that one token (decode);
* a free slot admits the oldest queued request and is fed its whole prompt (prefill);
* a slot still waiting for its token, or free with nothing queued, is a bubble.

A finished sequence frees its slot at once, so the next queued request enters on that slot's
very next turn (continuous batching). The queue is bounded: past `queue_limit` waiting requests
`submit` refuses with `QueueFull` (the RPC maps it to RESOURCE_EXHAUSTED).

Failover: `replay()` turns every request in flight back into a prefill of prompt + tokens so far
on a fresh pipeline. With row-independent deterministic kernels, a prefill of those tokens
yields the same next token as the decode would have, so the client sees the same tokens, later.
Admission order is submission order; request ids are unique among live requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field


class JournalError(Exception):
    """A request that cannot be accepted as given (INVALID_ARGUMENT)."""


class QueueFull(Exception):
    """The admission queue is at its bound (RESOURCE_EXHAUSTED)."""


@dataclass
class Entry:
    """One request and what it has produced so far."""

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    awaiting: bool = False  # fed to the pipeline, its next token not back yet
    finished: bool = False

    @property
    def context(self) -> tuple[int, ...]:
        return self.prompt + tuple(self.tokens)

    @property
    def next_position(self) -> int:
        """Where the next token fed in sits: after the prompt and all but the last token."""
        return len(self.prompt) + len(self.tokens) - 1


@dataclass(frozen=True)
class Feed:
    """What stage 0 feeds the pipeline for one slot at one tick."""

    slot: int
    request_id: str
    tokens: tuple[int, ...]
    start_position: int
    prefill: bool
    # The sequence position of the token the last stage will sample: the one index seeded
    # sampling draws at (`agents.sampling.sample_token`), as the reference executor does.
    sample_index: int


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    index: int  # 0-based among the request's generated tokens
    finished: bool


class Journal:
    def __init__(
        self,
        slots: int,
        max_context: int,
        queue_limit: int,
        eos_token_id: int | Collection[int] | None = None,
    ) -> None:
        if slots < 1 or max_context < 2 or queue_limit < 0:
            raise ValueError("slots >= 1, max_context >= 2, queue_limit >= 0")
        self.slots = slots
        self.max_context = max_context
        self.queue_limit = queue_limit
        # A sequence ends after emitting any of these (a model may have several EOS ids).
        self.eos_token_ids: frozenset[int] = (
            frozenset()
            if eos_token_id is None
            else frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        )
        self._queue: deque[Entry] = deque()
        self._by_slot: dict[int, Entry] = {}
        self._live: dict[str, Entry] = {}

    # --- admission --------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        vocab_size: int | None = None,
    ) -> Entry:
        """Queue a request; raises JournalError for bad input, QueueFull past the bound."""
        self._check(request_id, prompt, max_tokens, temperature, vocab_size)
        if self._waiting_beyond_slots() >= self.queue_limit:
            raise QueueFull(
                f"{len(self._queue)} requests already wait for {self.slots} slots "
                f"(queue limit {self.queue_limit})"
            )
        entry = Entry(request_id, tuple(prompt), max_tokens, temperature, seed)
        self._queue.append(entry)
        self._live[request_id] = entry
        return entry

    def _check(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        max_tokens: int,
        temperature: float,
        vocab_size: int | None,
    ) -> None:
        if not request_id:
            raise JournalError("request_id must not be empty")
        if request_id in self._live:
            raise JournalError(f"request_id {request_id!r} is already in flight")
        if not prompt:
            raise JournalError("the prompt is empty")
        if max_tokens < 1:
            raise JournalError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_context:
            raise JournalError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"maxContext {self.max_context}"
            )
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < vocab_size)
            raise JournalError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        if not temperature >= 0:
            raise JournalError(f"temperature must be >= 0, got {temperature}")

    def _waiting_beyond_slots(self) -> int:
        """Requests that would still wait if every slot took one: the queue's real length."""
        return len(self._by_slot) + len(self._queue) - self.slots

    # --- the tick loop ----------------------------------------------------------------------

    def feed(self, slot: int) -> Feed | None:
        """What to feed `slot` now, or None for a bubble."""
        entry = self._by_slot.get(slot)
        if entry is not None:
            if entry.awaiting or not entry.tokens:
                return None
            entry.awaiting = True
            return Feed(
                slot,
                entry.request_id,
                (entry.tokens[-1],),
                entry.next_position,
                prefill=False,
                sample_index=len(entry.prompt) + len(entry.tokens),
            )
        if not self._queue:
            return None
        entry = self._queue.popleft()
        entry.slot = slot
        entry.awaiting = True
        self._by_slot[slot] = entry
        context = entry.context
        return Feed(slot, entry.request_id, context, 0, prefill=True, sample_index=len(context))

    def on_token(self, slot: int, token: int) -> TokenEvent:
        """The last stage's sampled token for `slot` came back round the ring."""
        entry = self._by_slot.get(slot)
        if entry is None or not entry.awaiting:
            raise JournalError(f"a token arrived for slot {slot}, which awaits none")
        entry.awaiting = False
        entry.tokens.append(token)
        done = len(entry.tokens) >= entry.max_tokens or token in self.eos_token_ids
        if done:
            entry.finished = True
            del self._by_slot[slot]
            del self._live[entry.request_id]
        return TokenEvent(entry.request_id, token, len(entry.tokens) - 1, done)

    def cancel(self, request_id: str) -> bool:
        """Drop a request (client gone, deadline passed); its slot frees once idle."""
        entry = self._live.pop(request_id, None)
        if entry is None:
            return False
        if entry in self._queue:
            self._queue.remove(entry)
        elif entry.slot is not None and self._by_slot.get(entry.slot) is entry:
            entry.finished = True
            if not entry.awaiting:
                del self._by_slot[entry.slot]
        return True

    def cancelled(self, slot: int) -> bool:
        """Whether `slot` holds a cancelled request whose token is still in the ring (the
        adapter then calls `drop_cancelled` instead of `on_token` when it comes back)."""
        entry = self._by_slot.get(slot)
        return entry is not None and entry.finished

    def drop_cancelled(self, slot: int) -> None:
        """Free a cancelled request's slot when its in-flight token comes back."""
        entry = self._by_slot.get(slot)
        if entry is not None and entry.finished:
            del self._by_slot[slot]

    # --- failover ---------------------------------------------------------------------------

    def replay(self) -> list[Entry]:
        """Put every request in flight back at the head of the queue, in slot order, to be
        prefilled again (prompt + tokens so far) on a resynchronized pipeline."""
        running = [self._by_slot[s] for s in sorted(self._by_slot) if not self._by_slot[s].finished]
        for entry in running:
            entry.slot = None
            entry.awaiting = False
        self._by_slot.clear()
        self._queue.extendleft(reversed(running))
        return running

    # --- views ------------------------------------------------------------------------------

    def in_flight(self) -> Iterator[Entry]:
        yield from (self._by_slot[s] for s in sorted(self._by_slot))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._by_slot

"""The scheduler: which jobs join, and how far each row advances in the next step (issue 24's
first room).

It holds the queue (jobs and ``Release`` markers, in order, and the job taken that waits for
room), the running rows, admission (a job joins while the batch and the KV pool have room for all
its choices) and the step's plan: each row's share of the next forward pass.

- **One token** a row: the steady decoding step (``plan`` returns None), replayed from CUDA
  graphs on CUDA.
- **A prefill chunk**: a prompt joining in chunks (``joins_in_chunks``) takes up to ``chunk``
  tokens a step, the chunks of all such prompts sharing that budget, first joined first; with no
  other row decoding, its whole rest.
- **A draft** to check: a row that may draft (outputs.may_draft) proposes the tokens its grammar
  forces (a constrained row, up to ``FORCED_TOKENS``, from ``MIN_FORCED`` on: they are almost
  always kept), or tokens from a prompt lookup (up to ``draft_tokens``, from ``MIN_DRAFT`` on,
  while the batch has at most ``LOOKUP_ROWS`` rows: on the CPU a pass costs by its tokens, and
  larger batches lost, see docs/benchmarks.md). A constrained row where its grammar forces
  nothing may draft from its prompt too, the draft cut where the grammar would refuse a token (a
  tool call's ``prompt`` argument that copies the user's words). A row that may call tools drafts
  nothing until a call opens.

The runner turns the plan into one pass; outputs decide what each row keeps of it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from custom_handlers.inference.errors import OverloadedError
from custom_handlers.inference.jobs import Job, Release
from custom_handlers.inference.kvbatch import KVBatch
from custom_handlers.inference.loader import LoadedModel
from custom_handlers.inference.outputs import Row
from custom_handlers.inference.speculation import allowed_part, forced_draft

STOP = object()  # queued at exit: the engine thread stops

CHUNK_CPU = 256  # chunked prefill's chunk on the CPU (docs/benchmarks.md, issue 24)
CHUNK_CUDA = 1024  # on CUDA: a step with a chunk runs eagerly, so fewer, larger chunks
MIN_DRAFT = 4  # shorter lookup drafts are not checked (docs/benchmarks.md, issue 24)
DRAFT_TOKENS_CPU = 7  # speculation's default on the CPU (docs/benchmarks.md, issue 24)
# Prompt-lookup drafts are checked while the batch has at most this many rows, by each of them
# (docs/benchmarks.md, "Drafts in a batch": on this CPU 4 rows gained, 8 and 16 lost).
LOOKUP_ROWS = 4
# A grammar's forced tokens: up to this many a pass, checked from this many on (docs/benchmarks.md,
# "Grammar fast-forward"); they are almost always kept, so shorter runs pay than for prompt lookup.
FORCED_TOKENS = 15
MIN_FORCED = 1


@dataclass
class Share:
    """A row's part of a step: the tokens it feeds (none: it sits the step out)."""

    tokens: list[int]
    draft: list[int]  # of them, a draft to check (then ``tokens`` is ``[row.last, *draft]``)
    forced: bool = False  # the draft is the tokens the row's grammar forces
    chunk: bool = False  # a prompt's chunk (not yet in the KV)
    completes: bool = False  # the prompt's last chunk: the row samples its first token

    @property
    def chooses(self) -> bool:
        """The pass gives the row its next token(s)."""
        return bool(self.tokens) and (not self.chunk or self.completes)


class Scheduler:
    """The queue, the running rows, admission and each step's plan."""

    def __init__(
        self,
        max_rows: int,
        max_queue: int,
        draft_tokens: int | None,
        prefill_chunk: int | None,
    ):
        self.max_rows = max_rows
        self.max_queue = max_queue
        # Prompt-lookup speculation: draft tokens a step (0: off; None: DRAFT_TOKENS_CPU on the
        # CPU, off on CUDA until a GPU run measures it). Grammar drafts follow it (on or off).
        self.draft_tokens = draft_tokens
        # Chunked prefill: a longer prompt joining running rows takes this many tokens a step
        # (0: prompts are prefilled whole; None: CHUNK_CPU on the CPU, CHUNK_CUDA on CUDA).
        self.prefill_chunk = prefill_chunk
        self.rows: list[Row] = []
        self.jobs: queue.Queue[Job | Release | object] = queue.Queue()
        self.releases_queued = 0  # Release markers in ``jobs`` (not requests)
        self.release: Release | None = None  # taken from the queue: the batch drains, then unload
        self.waiting: Job | None = None  # taken from the queue, waiting for room in the batch
        self.lock = threading.Lock()  # release markers count

    # ---- the queue -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return max(0, self.jobs.qsize() - self.releases_queued) + (self.waiting is not None)

    @property
    def running(self) -> int:
        """Requests with a row still generating (a finished row waits a step to leave)."""
        rows = list(self.rows)  # the engine thread may replace the list meanwhile
        return len({id(r.job) for r in rows if r.running})

    @property
    def releasing(self) -> bool:
        """A release is asked for or under way."""
        return self.release is not None or self.releases_queued > 0

    def submit(self, job: Job) -> None:
        if self.queued >= self.max_queue:
            raise OverloadedError(
                f"The local model is busy: {self.queued} requests are waiting already "
                f"(LOCAL_LLM_MAX_QUEUE={self.max_queue}). Retry in a few seconds.",
                retry_after=2,
            )
        self.jobs.put(job)

    def put_release(self, marker: Release) -> None:
        with self.lock:
            self.releases_queued += 1
            self.jobs.put(marker)

    def arrived(self) -> bool:
        """A job waits to be taken (queued, or taken and waiting for room)."""
        return self.waiting is not None or self.jobs.qsize() > 0

    def next(self, block: bool, timeout: float | None) -> Job | Release | object:
        """The job waiting for room, else the queue's next (queue.Empty: none in time). A
        ``Release`` taken becomes ``release``."""
        if self.waiting is not None:
            job, self.waiting = self.waiting, None
            return job
        taken = self.jobs.get(block=block, timeout=timeout)
        if isinstance(taken, Release):
            with self.lock:
                self.releases_queued -= 1
            self.release = taken
        return taken

    def room_for(self, job: Job, taken: list[Job], batch: KVBatch) -> bool:
        """Whether the job's rows fit in the batch and the KV pool next to the running rows and
        the jobs ``taken`` to join with it."""
        if batch.budget is None and taken:  # the pool's size per token is not known yet
            return False
        joining = [*taken, job]
        rows = sum(j.sampling.n for j in joining)
        tokens = max(len(j.prompt_ids) + j.max_new_tokens for j in joining)
        return len(self.rows) + rows <= self.max_rows and batch.fits(rows, tokens)

    # ---- sizes ---------------------------------------------------------------------------------

    def chunk(self, loaded: LoadedModel) -> int:
        """Prompt tokens a row joining in chunks takes a step on ``loaded``'s device."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return CHUNK_CUDA if _on_cuda(loaded) else CHUNK_CPU

    def drafts(self, loaded: LoadedModel) -> int:
        """Prompt-lookup draft tokens a step on ``loaded``'s device."""
        if self.draft_tokens is not None:
            return self.draft_tokens
        return 0 if _on_cuda(loaded) else DRAFT_TOKENS_CPU

    def forced_drafts(self, loaded: LoadedModel) -> int:
        """Forced tokens a constrained row may check a pass: ``FORCED_TOKENS`` while drafts are
        on (``drafts``), none when they are off."""
        return FORCED_TOKENS if self.drafts(loaded) > 0 else 0

    def joins_in_chunks(self, loaded: LoadedModel, job: Job, reused: int) -> bool:
        """Whether ``job`` joins in chunks: rows are decoding (alone, a prompt is prefilled
        whole: nobody waits for it), its prompt has more than a chunk left after the prefix
        reused, one choice (``n`` choices would need the prompt copied into ``n`` slots at the
        end, room the batch may not have kept), no prompt logprobs (every position's logits)."""
        chunk = self.chunk(loaded)
        return (
            chunk > 0
            and loaded.packed
            and any(row.running for row in self.rows)
            and job.sampling.n == 1
            and job.prompt_logprobs is None
            and len(job.prompt_ids) - reused > chunk
        )

    # ---- the step's plan -----------------------------------------------------------------------

    def plan(self, loaded: LoadedModel) -> list[Share] | None:
        """Each row's share of the next step, in row order; None: one token each (the steady
        step). The plan changes nothing: the engine moves ``prompt_left`` on once it ran."""
        rows = self.rows
        drafts = self._drafts(loaded)
        chunking = any(row.prompt_left for row in rows)
        if not drafts and not chunking:
            return None
        # Nobody decoding (the running rows have left): the prompts' rest in this one pass.
        budget = self.chunk(loaded) if any(not row.prompt_left for row in rows) else None
        shares = []
        for i, row in enumerate(rows):
            if row.prompt_left:
                chunk = row.prompt_left[:budget]  # nothing once the step's budget is spent
                if budget is not None:
                    budget -= len(chunk)
                completes = bool(chunk) and len(chunk) == len(row.prompt_left)
                shares.append(Share(chunk, [], chunk=True, completes=completes))
            else:
                draft, forced = drafts.get(i, ([], False))
                shares.append(Share([row.last, *draft], draft, forced))
        return shares

    def _drafts(self, loaded: LoadedModel) -> dict[int, tuple[list[int], bool]]:
        """The drafts of the rows that draft this step, by row index, and whether each is what
        the row's grammar forces (module doc)."""
        rows = self.rows
        if not loaded.packed and len(rows) > 1:  # several rows, several tokens: packed only
            return {}
        lookup, forced = self.drafts(loaded), self.forced_drafts(loaded)
        if not lookup and not forced:
            return {}
        drafts, lookups = {}, len(rows) <= LOOKUP_ROWS
        for i, row in enumerate(rows):
            if row.lookup is None or not row.running or row.prompt_left:
                continue
            room = row.job.max_new_tokens - row.count - 1  # the pass's tokens stay in its columns
            matcher = row.matcher
            if matcher is not None:  # a constrained row: the tokens its grammar forces
                draft = forced_draft(matcher, min(forced, room), MIN_FORCED)
                if draft:
                    drafts[i] = (draft, True)
                    continue
            elif row.job.tools is not None:  # text that may open a call: no drafts until it does
                continue
            if not lookups:
                continue
            draft = row.lookup.draft(min(lookup, room))
            if matcher is not None:  # as far as the grammar allows it
                draft = allowed_part(matcher, draft)
            if len(draft) >= MIN_DRAFT:
                drafts[i] = (draft, False)
        return drafts

    def drop_finished(self) -> tuple[list[int], list[Row]]:
        """Finished rows and rows of cancelled jobs leave: the indices of the rows kept, and one
        row of each job cancelled (whose ``Done`` is still to be sent)."""
        keep, gone = [], {}
        for i, row in enumerate(self.rows):
            if row.job.cancelled and not row.done:
                gone[id(row.job)] = row
            elif not row.done:
                keep.append(i)
        if len(keep) != len(self.rows):
            self.rows = [self.rows[i] for i in keep]
        return keep, list(gone.values())


def _on_cuda(loaded: LoadedModel) -> bool:
    return str(loaded.model.device).startswith("cuda")

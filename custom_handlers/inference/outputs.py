"""Output processing: what a step's logits become for each row (issue 24's third room).

The runner hands back logits; this turns them into tokens and events: sampling with each row's
settings, penalties and ``logit_bias``, the JSON and tool-call constraints, drafts checked
(``verify``: speculation's and the grammar's forced tokens), text through each row's pipeline
(stop strings, think blocks), tool calls, logprobs, and the ``Finish`` of a row that ends. It
never touches the KV pool or the device's inputs (runner.py), nor decides who advances
(scheduler.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from custom_handlers.inference.constraints import JsonMatcher, mask_along, mask_logits
from custom_handlers.inference.errors import InvalidRequestError
from custom_handlers.inference.jobs import Delta, Failed, Finish, Job, TokenLogprob
from custom_handlers.inference.loader import LoadedModel, ModelHolder
from custom_handlers.inference.penalties import PenaltyCounts
from custom_handlers.inference.sampling import (
    BatchSampling,
    RowSampling,
    kept_logits,
    row_sampling,
    token_logprobs,
)
from custom_handlers.inference.speculation import PromptLookup, accept
from custom_handlers.inference.text import IncrementalDecoder, TextPipeline
from custom_handlers.inference.tools import CallDelta, CallReader

log = logging.getLogger("custom_handlers.engine")

# A prompt's own logprobs (echo with logprobs) are read this many positions at a time: each slice
# is copied to float32 (vocabulary x 4 bytes a position: 150k tokens, 0.6 MB).
_PROMPT_LOGPROB_ROWS = 256


@dataclass
class Row:
    """One choice of one job, in the batch."""

    job: Job
    index: int
    pipeline: TextPipeline
    sampling: RowSampling
    matcher: JsonMatcher | None
    last: int = -1  # the token sampled last, fed at the next step
    count: int = 0  # tokens generated
    done: bool = False
    calls: CallReader | None = None  # set once the row starts calling tools
    call_text: IncrementalDecoder | None = None  # the open call's text
    sampled_logprob: tuple | None = None  # (token, logprob, top) of the token sampled last
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with text
    lookup: PromptLookup | None = None  # prompt and answer so far, for drafts (speculation on)
    prompt_left: list[int] = field(default_factory=list)  # joining in chunks: not yet in the KV

    @property
    def running(self) -> bool:
        return not self.done and not self.job.cancelled


def may_draft(row: Row) -> bool:
    """Rows whose next token depends only on the model's distribution, the row's own tokens and
    its grammar (penalties, bias and the grammar's mask are replayed position by position along
    the draft): no logprobs asked; greedy, or sampled without a seed (a seeded row must give the
    same answer whatever else runs, and its random draws would differ with drafts). What a row
    drafts is the scheduler's choice (``Scheduler.draft``)."""
    return (row.sampling.greedy or not row.sampling.seeded) and row.job.logprobs is None


@dataclass(frozen=True)
class ChoicePlan:
    """Which rows ``Outputs.choose`` must look at beyond the sampling, from what does not change
    while a row runs: kept with the steady rows, so a step does not go over every row four times."""

    penalties: list  # each row's RowPenalties or None
    penalised: bool  # some row has penalties or a logit_bias
    logprobs: list[int]  # rows asking for logprobs (while not inside a tool call)
    may_constrain: list[int]  # rows with a matcher, or tools (whose first call brings one)
    no_calls: list[tuple[int, int]]  # (row, its tool-call opening token): tool_choice "none"

    @classmethod
    def of(cls, rows: list[Row]) -> ChoicePlan:
        penalties = [r.sampling.penalties for r in rows]
        return cls(
            penalties,
            any(p is not None for p in penalties),
            [i for i, r in enumerate(rows) if r.job.logprobs is not None],
            [i for i, r in enumerate(rows) if r.matcher is not None or r.job.tools is not None],
            [
                (i, r.job.tools.open_id)
                for i, r in enumerate(rows)
                if r.job.tools is not None and r.job.tools.grammar is None
            ],
        )


class Outputs:
    """Tokens from logits, and events from tokens, for the rows of the batch."""

    def __init__(
        self,
        holder: ModelHolder,
        job_done: Callable[[Job], None],
        rows: Callable[[], list[Row]],
    ):
        self._holder = holder
        self._job_done = job_done  # a job's last row finished: Done, and the keep-alive
        self._rows = rows  # the batch's rows (a failing constraint ends its job's other rows)
        self.penalty_counts = PenaltyCounts()  # token counts of the rows with penalties
        self.drafted = self.accepted = 0  # draft tokens checked, and kept, since start
        self.forced_drafted = self.forced_accepted = 0  # of them, a grammar's forced tokens

    def new_row(self, job: Job, index: int, loaded: LoadedModel, drafts: bool) -> Row:
        """Choice ``index`` of ``job``; with ``drafts``, a prompt lookup if it may draft."""
        sampling = row_sampling(
            job.sampling, loaded.generation_defaults, loaded.model.device, index, job.prompt_ids
        )
        grammar = job.grammar
        if job.tools is not None and job.tools.from_start:
            grammar = job.tools.grammar
        matcher = loaded.constraints.matcher(grammar) if grammar else None
        pipeline = TextPipeline(loaded.tokenizer, job.sampling.stop, drop_think=not job.raw_text)
        row = Row(job, index, pipeline, sampling, matcher)
        if drafts and may_draft(row):
            row.lookup = PromptLookup(job.prompt_ids)
        return row

    # ---- tokens from logits --------------------------------------------------------------------

    def choose(self, rows: list[Row], logits, sampling: BatchSampling | None = None, plan=None):
        """The rows' next tokens from their ``logits`` ``[rows, vocab]``: a list, and the same on
        the device. ``sampling`` and ``plan``: the steady rows' own, kept between steps."""
        plan = plan or ChoicePlan.of(rows)
        # Log-probabilities come from the model's own distribution, before sampling settings and
        # constraints change it (as vLLM's default): what the model thinks of each token.
        asking = [i for i in plan.logprobs if rows[i].calls is None]
        distribution = logits[asking].log_softmax(dim=-1) if asking else None
        # Penalties and logit_bias before the grammar's mask: a token it forbids stays -inf.
        penalties, penalised = plan.penalties, plan.penalised
        if penalised:
            self.penalty_counts.apply(logits, penalties)
        constrained = [i for i in plan.may_constrain if rows[i].matcher is not None]
        if constrained:
            mask_logits(logits, constrained, [rows[i].matcher for i in constrained])
        for i, open_id in plan.no_calls:  # tool_choice "none": the model may not open a call
            logits[i, open_id] = float("-inf")
        sampling = sampling or BatchSampling([r.sampling for r in rows])
        chosen = sampling.choose(logits)
        tokens = chosen.tolist()  # the step's one wait for the device
        if penalised:
            self.penalty_counts.count(penalties, tokens)
        if asking:
            top = [rows[i].job.logprobs for i in asking]
            noted = token_logprobs(distribution, [tokens[i] for i in asking], top)
            for i, entry in zip(asking, noted, strict=True):
                rows[i].sampled_logprob = entry
        return tokens, chosen

    def verify(self, row: Row, draft: list[int], logits, forced: bool = False) -> list[int]:
        """The tokens a row keeps of a pass over its last token and ``draft`` (``logits`` ``[1 +
        len(draft), vocab]``, float32): the draft's prefix it would have written itself and one
        more token (``speculation.accept``), with its penalties, bias and grammar replayed
        position by position as ``choose`` applies them to one. ``forced``: the draft is what
        the row's grammar forces (counted apart)."""
        block = 1 + len(draft)
        penalties = row.sampling.penalties
        if penalties is not None:  # position j's counts include the draft's first j tokens
            for j in range(block):
                if j:
                    self.penalty_counts.count([penalties], [draft[j - 1]])
                self.penalty_counts.apply(logits[j : j + 1], [penalties])
        if row.matcher is not None:  # after penalties and bias, as in choose
            mask_along(logits, row.matcher, draft)
            tools = row.job.tools
            if tools is not None and tools.grammar is None:  # "none" next to a JSON answer
                logits[:, tools.open_id] = float("-inf")
        if not row.sampling.greedy:
            logits = kept_logits(logits, [row.sampling] * block)
        tokens = accept(logits, draft, row.sampling.greedy, row.sampling.generator)
        if penalties is not None:  # counted: the whole draft; written: its kept part, then one
            rejected = draft[len(tokens) - 1 :]
            self.penalty_counts.count([penalties] * len(rejected), rejected, by=-1.0)
            self.penalty_counts.count([penalties], [tokens[-1]])
        self.drafted += len(draft)
        self.accepted += len(tokens) - 1
        if forced:
            self.forced_drafted += len(draft)
            self.forced_accepted += len(tokens) - 1
        return tokens

    def prompt_logprobs(self, loaded: LoadedModel, job: Job, logits) -> list[TokenLogprob]:
        """The log-probability of each prompt token after the ones before it (from the prefill's
        logits ``[prompt, vocab]``), with ``job.prompt_logprobs`` alternatives each."""
        ids, spell, entries = job.prompt_ids, loaded.constraints.token_text, []
        for start in range(0, len(ids) - 1, _PROMPT_LOGPROB_ROWS):  # float32 copies, a slice each
            end = min(start + _PROMPT_LOGPROB_ROWS, len(ids) - 1)
            distribution = logits[start:end].float().log_softmax(dim=-1)
            top = [job.prompt_logprobs] * (end - start)
            entries += [
                TokenLogprob(*spell(token), lp, tuple((*spell(t), v) for t, v in alternatives))
                for token, lp, alternatives in token_logprobs(
                    distribution, ids[start + 1 : end + 1], top
                )
            ]
        return entries

    # ---- events from tokens --------------------------------------------------------------------

    def advance(self, rows: list[Row], tokens: list[int], eos: frozenset[int]) -> None:
        """Row ``rows[i]`` takes ``tokens[i]`` (a row may come several times: a draft's tokens).
        Once a step for every row: what a row without tools, logprobs or a constraint does not
        need is skipped before any call (``_tool_token``, ``_note_logprob``, ``_take_logprobs``
        would each find nothing to do)."""
        for row, token in zip(rows, tokens, strict=True):
            job = row.job
            if row.done or job.cancelled:
                continue
            row.last = token
            row.count += 1
            if row.lookup is not None:
                row.lookup.extend((token,))
            if row.matcher is not None:
                row.matcher.consume(token)
            if token in eos:
                if row.matcher is not None and (error := row.matcher.error) is not None:
                    self._constraint_gave_up(row, error)
                else:
                    self._finish(row, "tool_calls" if row.calls and row.calls.complete else "stop")
                continue
            if job.tools is not None and self._tool_token(row, token):
                pass
            elif row.calls is not None:
                self._emit(row, row.calls.push(row.call_text.push(token)))
            else:
                if row.sampled_logprob is not None:
                    self._note_logprob(row)
                pipeline = row.pipeline
                text = pipeline.push(token)
                if text:
                    logprobs = self._take_logprobs(row) if row.logprobs else ()
                    job.emit(Delta(row.index, text, logprobs))
                if pipeline.stopped:
                    self._finish(row, "stop")
                    continue
            if row.count >= job.max_new_tokens:
                self._finish(row, "length")

    def _constraint_gave_up(self, row: Row, error: str) -> None:
        """The JSON constraint ran out of llguidance's budgets mid-answer (a long forced run):
        its mask then allows only end-of-turn. The answer is not valid JSON, so the request fails
        with a 400 naming ``response_format`` instead of finishing with ``stop``; its other rows
        leave with it."""
        job = row.job
        for other in self._rows():
            if other.job is job:
                other.done = True
        job.open_rows = 0
        log.info("The JSON constraint gave up after %d tokens: %s", row.count, error.split("\n")[0])
        gave_up = InvalidRequestError(
            f"The local model's JSON constraint gave up after {row.count} tokens: this schema "
            "asks for more than it can follow token by token (a long run of forced items or "
            "characters). Simplify it: smaller minItems / minLength, fewer forced values.",
            param="response_format",
        )
        job.emit(Failed(gave_up))
        self._job_done(job)  # Done, and the keep-alive counts from here as for any job

    def _tool_token(self, row: Row, token: int) -> bool:
        """Open or close a tool call at its marker token; False for any other token."""
        tools = row.job.tools
        if tools is None or tools.grammar is None or token not in (tools.open_id, tools.close_id):
            return False
        if token == tools.close_id:
            if row.calls is None:
                return False
            self._emit(row, row.calls.push(row.call_text.flush()) + row.calls.close())
            return True
        if row.calls is None:  # the first call: the text so far is the answer's content
            self._emit_text_tail(row)
            row.calls = CallReader(row.index)
            if row.matcher is None:  # "auto": the grammar starts at this very token
                row.matcher = self._holder.get().constraints.matcher(tools.grammar)
                row.matcher.consume(token)
        row.calls.open()
        row.call_text = IncrementalDecoder(self._holder.get().tokenizer)
        return True

    def _emit(self, row: Row, deltas: list[CallDelta]) -> None:
        for delta in deltas:
            row.job.emit(delta)

    def _emit_text_tail(self, row: Row) -> None:
        tail = row.pipeline.flush()
        if tail or row.logprobs:
            row.job.emit(Delta(row.index, tail, self._take_logprobs(row)))

    def _note_logprob(self, row: Row) -> None:
        """Keep the log-probability of a token of text (not of a call, nor the end of turn)."""
        if row.sampled_logprob is None:
            return
        token, logprob, top = row.sampled_logprob
        spell = self._holder.get().constraints.token_text
        alternatives = tuple((*spell(t), lp) for t, lp in top)
        row.logprobs.append(TokenLogprob(*spell(token), logprob, alternatives))
        row.sampled_logprob = None

    def _take_logprobs(self, row: Row) -> tuple[TokenLogprob, ...]:
        taken, row.logprobs = tuple(row.logprobs), []
        return taken

    def _finish(self, row: Row, reason: str) -> None:
        if row.calls is None:
            self._emit_text_tail(row)
        row.done = True
        complete = row.calls.complete if row.calls else 0
        thought = row.pipeline.reasoning_tokens
        row.job.emit(Finish(row.index, reason, row.count, complete, thought))
        row.job.open_rows -= 1
        if row.job.open_rows == 0:
            self._job_done(row.job)

    def retain(self, rows: list[Row]) -> None:
        """Only ``rows`` are left in the batch: the others' penalty counts go."""
        self.penalty_counts.retain([r.sampling.penalties for r in rows])

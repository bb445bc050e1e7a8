"""Host work per decoding step (issue 23, item 4): what a steady step copies and waits for.

On CUDA a step replayed from a graph takes 2-3.5 ms for Qwen3-4B; every copy from a Python list
to the device (``torch.tensor(list, device=...)``, indexing by a list) is a blocking copy that also
waits for the device, and every read of a device value (``tolist``, ``item``, ``bool``) waits for
it. A steady step (the same rows as the step before) may wait once, to read the chosen token ids
the text needs, and copy nothing from the host.

No GPU here: the counter below sees every torch call the engine makes on its own thread while a
step runs, outside the model's forward pass (what a CUDA graph replays), on the real engine and
the tiny random Qwen3. It counts what would cross between host and device if the tensors were on
CUDA: a tensor made from host data (``aten.lift_fresh``: ``torch.tensor`` of a list, an index
given as a list, ``from_numpy``), and a read of device values (``tolist``, ``item``/``bool``/
``float`` (``aten._local_scalar_dense``), ``numpy``, ``cpu``, and the ops whose output size
depends on the values: ``nonzero``, ``masked_select``, an index by a boolean mask).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from custom_handlers.inference.sampling import RowSampling, kept_logits
from tests.pace import Gate, wait_for
from tests.test_batching import _messages
from tests.test_kv_pool import handler as kv_pool_handler

ROWS = 16
_READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
_WAITING_OPS = {"aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense"}
_WAITING_OPS |= {"aten::unique_consecutive", "aten::_unique2", "aten::repeat_interleave"}


class HostTransfers:
    """Counts, on the thread that enters it, host<->device crossings outside a model's forward.

    ``syncs``: reads of device values (each waits for the device); ``host_copies``: tensors made
    from host data (each a blocking copy to the device). Each entry names what did it."""

    def __init__(self, model) -> None:
        self.syncs: list[str] = []
        self.host_copies: list[str] = []
        self._paused = 0  # inside the model's forward
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", str(func))
                if not counter._paused and name in _READS:
                    counter.syncs.append(name)
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if not counter._paused:
                    if name in ("aten::lift_fresh", "aten::lift_fresh_copy"):
                        counter.host_copies.append(name)
                    elif name in _WAITING_OPS and name != "aten::_local_scalar_dense":
                        counter.syncs.append(name)
                    elif name.startswith("aten::index") and _boolean_index(args):
                        counter.syncs.append(f"{name} by a boolean mask")
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Dispatch())
        self._hooks = (
            model.register_forward_pre_hook(self._pause, prepend=True),
            model.register_forward_hook(self._resume),
        )

    def _pause(self, *args) -> None:
        self._paused += 1

    def _resume(self, *args) -> None:
        self._paused -= 1

    def __enter__(self) -> HostTransfers:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def counts(self) -> dict[str, list[str]]:
        return {"syncs": self.syncs, "host_copies": self.host_copies}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def counted_steps(model_dir, bodies: list[dict], mode: str | None) -> list[dict]:
    """Decode ``ROWS`` requests (``bodies`` in turn) together on the real engine (tiny model;
    ``mode`` "static": the graph path as on CUDA, None: eager); for every decoding step: the
    rows, whether they were the same as the step before's, and what crossed between host and
    device outside the forward.

    End-of-turn ends nothing here (random weights end turns at random points, as bench/gpu.py
    says): every row runs its ``max_tokens``, so the batch keeps its rows from step to step."""
    local = kv_pool_handler(model_dir, max_batch_size=ROWS)
    engine = local.engine
    engine.graph_mode = mode
    # No drafts: a row alone at the start (the first to join, held at the gate below) could
    # otherwise check a prompt-lookup draft, a pass of its own that copies its draft from the
    # host (issue 24), when its first sampled token happens to start a match in its prompt.
    engine.draft_tokens = 0
    loaded = local.holder.get()
    local.holder._loaded = dataclasses.replace(loaded, eos_token_ids=frozenset())
    steps, last = [], []
    real_step = engine._step

    def step() -> None:  # the engine thread's own step, counted
        nonlocal last
        rows = list(engine.scheduler.rows)
        counter = HostTransfers(loaded.model)
        try:
            with counter:
                real_step()
        finally:
            counter.remove()
        same = len(rows) == len(last) and all(a is b for a, b in zip(rows, last, strict=True))
        steps.append({"rows": len(rows), "steady": same, **counter.counts()})
        last = rows

    engine._step = step
    # A first request alone: the graph path captures its graphs at load (their warm-up steps are
    # decoding passes too, which the gate below would hold before any request joins).
    asyncio.run(local.acompletion("x", _messages(0), optional_params=bodies[0]))
    steps.clear()
    # The first request is held at its first decoding step until the others wait in the queue:
    # they then join together, and the batch runs ROWS rows from one step to the next.
    gate = Gate(loaded.model).close()

    async def together():
        asks = [
            asyncio.create_task(
                local.acompletion("x", _messages(i), optional_params=bodies[i % len(bodies)])
            )
            for i in range(ROWS)
        ]
        assert await asyncio.to_thread(gate.held)
        assert await asyncio.to_thread(wait_for, lambda: engine.running + engine.queued == ROWS)
        gate.open()
        return await asyncio.gather(*asks)

    try:
        answers = asyncio.run(together())
    finally:
        gate.remove()
    assert all(a.usage.completion_tokens == bodies[0]["max_tokens"] for a in answers)
    return steps


SAMPLED = {"max_tokens": 12}  # the checkpoint's defaults: temperature 0.7, top_p 0.8, top_k 20
GREEDY = {"max_tokens": 12, "temperature": 0}


@pytest.mark.parametrize("mode", ["static", None], ids=["graph-path", "eager"])
@pytest.mark.parametrize(
    "bodies", [[SAMPLED], [GREEDY], [SAMPLED, GREEDY]], ids=["sampled", "greedy", "mixed"]
)
def test_a_steady_step_waits_once_and_copies_nothing_from_the_host(tiny_model_dir, bodies, mode):
    steps = counted_steps(tiny_model_dir, bodies, mode)
    steady = [s for s in steps if s["steady"] and s["rows"] == ROWS]
    assert len(steady) >= 5, [(s["rows"], s["steady"]) for s in steps]
    for s in steady:
        assert len(s["syncs"]) <= 1 and not s["host_copies"], s
        assert s["syncs"] == ["tolist"]  # the chosen ids, for the text
    # Rows joining or leaving: their state goes to the device again (a few copies, once).
    assert all(len(s["host_copies"]) <= 3 for s in steps if not s["steady"])


def test_steady_steps_look_at_the_rows_once(tiny_model_dir, monkeypatch):
    """What ``Outputs.choose`` looks for in each row (penalties, logprobs, constraints, tool
    choice) does not change while the rows stay the same: it is gathered when they change (and for
    each row joining), not four passes over every row a step."""
    from custom_handlers.inference import outputs

    made = []
    real = outputs.ChoicePlan.of.__func__

    def counted(cls, rows):
        made.append(len(rows))
        return real(cls, rows)

    monkeypatch.setattr(outputs.ChoicePlan, "of", classmethod(counted))
    steps = counted_steps(tiny_model_dir, [SAMPLED], "static")
    steady = [s for s in steps if s["steady"] and s["rows"] == ROWS]
    assert len(steady) >= 5
    changed = [s for s in steps if s["rows"] == ROWS and not s["steady"]]  # they make one
    assert made.count(ROWS) == len(changed) < len(steady)  # (joins make theirs: 1 row each)


# ---- the kept candidates: the same as a sort of the whole vocabulary ---------------------------


def _sorted_kept(logits, rows: list[RowSampling]):
    """The candidates as a full sort kept them before (main's ``sampling._kept``), in vocabulary
    order: the reference the top-k path must agree with."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([r.temperature for r in rows], device=device).unsqueeze(1)
    top_k = torch.tensor([min(r.top_k or vocab, vocab) for r in rows], device=device).unsqueeze(1)
    top_p = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(1)
    ordered, order = torch.sort(logits / temperature, dim=-1, descending=True)
    if any(r.min_p for r in rows):
        floor = torch.tensor([math.log(r.min_p) if r.min_p else -math.inf for r in rows])
        ordered = ordered.masked_fill(ordered < ordered[:, :1] + floor.unsqueeze(1), -math.inf)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    ordered = ordered.masked_fill(ranks >= top_k, -math.inf)
    probs = ordered.softmax(dim=-1)
    ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs > top_p, -math.inf)
    return torch.empty_like(ordered).scatter_(1, order, ordered)


def _row(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0) -> RowSampling:
    return RowSampling(False, temperature, top_p, top_k, torch.Generator().manual_seed(0), min_p)


@pytest.mark.parametrize(
    "rows",
    [
        [_row()] * 16,  # the checkpoint's defaults: a top-k of 20, not a sort of the vocabulary
        [_row(top_k=5), _row(top_k=50, top_p=0.95), _row(min_p=0.05), _row(top_k=1)],
        [_row(top_k=0), _row(top_k=20, min_p=0.1), _row(temperature=1.3, top_p=1.0)],  # a sort
        [_row(top_k=10**9, top_p=0.5), _row(top_k=3, top_p=1.0, min_p=0.5)],
    ],
    ids=["defaults", "mixed-top-k", "one-without-top-k", "past-the-vocabulary"],
)
def test_the_candidates_are_those_a_sort_of_the_whole_vocabulary_kept(rows):
    generator = torch.Generator().manual_seed(3)
    for scale in (0.5, 3.0, 10.0):
        logits = torch.randn(len(rows), 1000, generator=generator) * scale
        got, want = kept_logits(logits, rows), _sorted_kept(logits, rows)
        assert torch.equal(got.isfinite(), want.isfinite())
        assert torch.allclose(got[want.isfinite()], want[want.isfinite()])


class _Reads(torch.nn.Module):
    def forward(self, x):
        return x * torch.tensor([2.0]).tolist()[0]  # inside a forward: not counted


def test_the_counter_sees_what_it_counts():
    """The counter itself: copies from the host and reads, outside the forward only, on the
    thread that counts (the engine's steps run on a thread of their own)."""
    model, seen = _Reads(), []

    def run():
        counter = HostTransfers(model)
        with counter:
            x = torch.tensor([[1.0, 2.0]])  # a copy from a list
            model(x)
            x[[0]].sum().item()  # an index by a list (a copy), a read
            x[x > 1].tolist()  # an index by a boolean mask, a read
            x.argmax(dim=-1)  # neither
        counter.remove()
        seen.append(counter.counts())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [
        {
            "host_copies": ["aten::lift_fresh"] * 2,
            "syncs": ["item", "aten::index by a boolean mask", "tolist"],
        }
    ]


def test_rows_without_a_seed_share_one_draw_and_still_sample_their_distribution():
    import random

    from torch.utils._python_dispatch import TorchDispatchMode

    from custom_handlers.inference.sampling import BatchSampling

    class Draws(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.uniform_.default:
                Draws.count += 1
            return func(*args, **(kwargs or {}))

    random.seed(0)  # the shared generator's seed: the draws below are deterministic
    vocab = 50
    unseeded = [RowSampling(False, 1.0, 1.0, 3, None, seeded=False) for _ in range(12)]
    seeded = [RowSampling(False, 1.0, 1.0, 3, torch.Generator().manual_seed(i)) for i in range(4)]
    batch = BatchSampling(unseeded + seeded)
    logits = torch.full((16, vocab), -5.0)
    logits[:, :3] = torch.tensor([2.0, 1.0, 0.0])
    with Draws():
        batch.choose(logits)
    assert Draws.count == 1 + 4  # one for the 12 rows without a seed, one per seeded row
    counts = torch.zeros(3)
    for _ in range(300):
        counts += torch.bincount(batch.choose(logits)[:12], minlength=vocab)[:3]
    probs = torch.tensor([2.0, 1.0, 0.0]).softmax(dim=0)  # top_k 3: the rest never drawn
    expected = probs * counts.sum()
    assert counts.sum() == 300 * 12
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.82  # chi-square, 2 df, 0.001


# ---- the draw: few operations a step, the same tokens -------------------------------------------


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.removeprefix("aten::"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_a_steady_draw_of_rows_without_a_seed_runs_few_operations(temperature):
    """16 rows without a seed, the same settings: each torch operation is a launch on a GPU and
    5-10 us of host time on this CPU. A kept ``BatchSampling``'s step: the temperature (none at
    1: x / 1 is x), topk, top-p (softmax, cumsum, the mass before, the mask), one draw, the Gumbel
    transform in place, the choice; no slices of the noise buffer, no copies."""
    from custom_handlers.inference.sampling import BatchSampling

    rows = [
        RowSampling(False, temperature, 0.8, 20, torch.Generator(), seeded=False)
        for _ in range(ROWS)
    ]
    batch, logits = BatchSampling(rows), torch.randn(ROWS, 645)
    batch.choose(logits)  # the first step makes the settings and the buffers
    with _Ops() as seen:
        batch.choose(logits)
    want = ["topk", "_softmax", "cumsum", "sub_", "gt", "masked_fill_", "uniform_", "clamp_"]
    want += ["log_", "neg_", "log_", "sub", "argmax", "gather", "squeeze"]
    assert seen.ops == (["div"] if temperature != 1.0 else []) + want


def _reference_draw(logits, rows: list[RowSampling]) -> list[int]:
    """Each seeded row's token as the draw was first written (out of place, a row at a time):
    its own generator's uniform noise over the whole vocabulary, the Gumbel-max over its kept
    candidates, best first. The generators are copies: the rows' own are left as they were."""
    out = []
    ordered, order = _kept_for(logits, rows)
    for i, row in enumerate(rows):
        generator = torch.Generator().set_state(row.generator.get_state())
        noise = torch.rand(logits.shape[-1], generator=generator)[: ordered.shape[-1]]
        noise = noise.clamp(min=torch.finfo(torch.float32).tiny)
        choice = (ordered[i] - noise.log().neg().log()).argmax()
        out.append(int(order[i, choice]))
    return out


def _kept_for(logits, rows):
    """The candidates, out of place and every mask applied (a top_k at the width masks none)."""
    vocab = logits.shape[-1]
    top_k = [min(r.top_k or vocab, vocab) for r in rows]
    width = max(top_k)
    column = lambda values: torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    scaled = logits / column([r.temperature for r in rows])
    if width < vocab:
        ordered, order = scaled.topk(width, dim=-1)
    else:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
    if any(r.min_p for r in rows):
        floor = column([math.log(r.min_p) if r.min_p else -math.inf for r in rows])
        ordered = ordered.masked_fill(ordered < ordered[:, :1] + floor, -math.inf)
    ordered = ordered.masked_fill(torch.arange(width)[None, :] >= column(top_k), -math.inf)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    return ordered.masked_fill(before > column([r.top_p for r in rows]), -math.inf), order


def test_seeded_rows_draw_the_same_tokens_as_the_draw_first_written():
    """The in-place Gumbel transform, the skipped division and the masks written in place give
    the same tokens, to the bit, as the straightforward draw: a seeded answer does not change."""
    import random

    from custom_handlers.inference.sampling import BatchSampling

    rng = random.Random(1)
    for _ in range(40):
        vocab = rng.choice([50, 645])
        rows = [
            RowSampling(
                False,
                rng.choice([1.0, 0.7, 1.3]),
                rng.choice([1.0, 0.8, 0.3]),
                rng.choice([0, 1, 5, 20, vocab]),
                torch.Generator().manual_seed(rng.randrange(2**31)),
                rng.choice([0.0, 0.05]),
            )
            for _ in range(rng.randrange(1, 9))
        ]
        batch = BatchSampling(rows)
        for _ in range(4):  # steps: each row's stream goes on from where it was
            logits = torch.randn(len(rows), vocab) * rng.choice([0.5, 3.0, 20.0])
            want = _reference_draw(logits, rows)
            assert batch.choose(logits).tolist() == want

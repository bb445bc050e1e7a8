"""The local models the gateway serves, by name, and which of them hold memory.

Each model declared in ``proxy_config.yaml`` (``catalog.LocalEntry``) gets a ``LocalModel``: its
settings, its ``ModelHolder`` (load and unload) and its own ``Engine`` (batch, queue, keep_alive),
so two models never share a batch or a queue. A model loads on its first request.

At most ``max_loaded`` models hold memory at once (``LOCAL_LLM_MAX_LOADED_MODELS``, 1 by default:
the GPU is shared with the image model). Every load goes through ``Registry.room``: when the limit
is reached, the least recently used *idle* loaded model is unloaded first (its engine's release,
the same path as ``POST /local/release``), and a model with requests running or queued is never
unloaded under them: the load waits until one is idle. Loads are one at a time. A load that fails
for lack of memory unloads every idle model and tries once more (``ModelHolder``).

    provider -> Registry.find(name) -> LocalModel(holder, engine) -> loader / engine

No LiteLLM here: the registry is part of the inference stack, which stands alone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from custom_handlers.inference.catalog import PREFIX, LocalEntry
from custom_handlers.inference.engine import Engine
from custom_handlers.inference.errors import InvalidRequestError, OverloadedError
from custom_handlers.inference.jobs import Release
from custom_handlers.inference.loader import ModelHolder
from custom_handlers.inference.settings import LocalModelSettings

log = logging.getLogger("custom_handlers.registry")

DEFAULT_NAME = "local"  # the one model of a registry made without a configuration
_WAIT_STEP_S = 0.05  # how often a load waiting for room looks again


class LocalModel:
    """One local model: its settings, its holder, its engine, and when it was last asked for."""

    def __init__(
        self,
        name: str,
        settings_factory: Callable[[], LocalModelSettings],
        registry: Registry | None = None,
        model_id: str | None = None,
        holder: ModelHolder | None = None,
    ):
        self.name = name
        self.model_id = model_id  # what follows "zlocal/" in its entry; None: any
        self.settings = settings = settings_factory()
        self.holder = holder or ModelHolder(settings_factory)
        if registry is not None:
            self.holder.room = registry
        self.engine = Engine(
            self.holder,
            settings.max_batch_size,
            settings.max_queue,
            settings.keep_alive,
            int(settings.prefix_cache_mb * 2**20),
            int(settings.kv_cache_mb * 2**20),
            settings.cuda_graphs,
            settings.draft_tokens,
            settings.prefill_chunk,
        )
        self.last_used = 0.0  # monotonic time of the last request; 0: never asked for
        self.arriving = 0  # requests not yet in the engine's queue (waiting for the model to load)
        self.load_task = None  # the provider's load under way (an asyncio task), if any

    @property
    def loaded(self) -> bool:
        return self.holder.loaded is not None

    @property
    def queued(self) -> int:
        """Requests waiting: in the engine's queue, or for the model to load."""
        return self.engine.queued + self.arriving

    @property
    def idle(self) -> bool:
        """No request running, queued or on its way: the model may be unloaded."""
        return not (self.engine.running or self.queued or self.engine.releasing)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """A request on its way to the engine (loading the model, templating): the model is
        marked used, the request counts as queued and the model as busy. A request that would
        wait beyond ``max_queue`` gets a 503 with Retry-After instead."""
        self.touch()
        if self.queued >= self.settings.max_queue:
            raise OverloadedError(
                f"The local model {self.name!r} is busy: {self.queued} requests are waiting "
                f"already (max_queue {self.settings.max_queue}). Retry in a few seconds.",
                retry_after=2,
            )
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    def touch(self) -> None:
        self.last_used = time.monotonic()


class Registry:
    """The local models by name; the gate every load of theirs goes through."""

    def __init__(self, max_loaded: int = 1):
        self.max_loaded = max_loaded
        self.models: dict[str, LocalModel] = {}
        self._room = threading.Lock()  # one load (and the unloads it needs) at a time

    @classmethod
    def of_entries(cls, entries: list[LocalEntry], max_loaded: int) -> Registry:
        registry = cls(max_loaded)
        for entry in entries:
            model_id = entry.model[len(PREFIX) :]
            registry.add(LocalModel(entry.name, lambda s=entry.settings: s, registry, model_id))
        return registry

    @classmethod
    def single(cls, holder: ModelHolder | None = None) -> Registry:
        """One model, ``DEFAULT_NAME``, that answers every ``zlocal/...`` name: its settings are
        the ``LOCAL_LLM_*`` variables (read again at each load). The gateway without a
        configuration file (the handler used as a library, in tests and benchmarks)."""
        registry = cls(1)
        holder = holder or ModelHolder(LocalModelSettings)
        registry.add(LocalModel(DEFAULT_NAME, holder.settings_factory, registry, holder=holder))
        return registry

    def add(self, model: LocalModel) -> None:
        self.models[model.name] = model

    # ---- which model a request is for ---------------------------------------------------------

    def find(self, name: str | None, model_id: str) -> LocalModel:
        """The model a request for deployment ``zlocal/<model_id>`` of ``name`` is for.

        Only declared models are served: an id that no entry declares (a wildcard entry, a model
        added outside the configuration) is refused before anything is loaded.
        """
        model = self.models.get(name) if name is not None else None
        if model is not None and model.model_id in (None, model_id):
            return model
        matches = [m for m in self.models.values() if m.model_id in (None, model_id)]
        if len(matches) == 1:
            return matches[0]
        if matches and name is None:  # several entries share the id: the first, as listed
            return matches[0]
        declared = ", ".join(self.models) or "none"
        raise InvalidRequestError(
            f"'{PREFIX}{model_id}' is not a local model of this gateway's proxy_config.yaml "
            f"(local models: {declared}). Local models are declared there, one entry each; "
            "restart the gateway after adding one.",
            param="model",
        )

    # ---- room for a load (called by ModelHolder, on the thread that loads) --------------------

    @contextlib.contextmanager
    def admit(self, holder: ModelHolder) -> Iterator[None]:
        """Hold the room for ``holder``'s load: unload idle models until it fits, waiting for
        busy ones to become idle; loads happen one at a time."""
        with self._room:
            said = False
            while True:
                others = [m for m in self.models.values() if m.holder is not holder and m.loaded]
                if len(others) < self.max_loaded:
                    break
                idle = [m for m in others if m.idle]
                if idle:
                    victim = min(idle, key=lambda m: m.last_used)
                    self._unload(victim, f"to make room for {self._name_of(holder)!r}")
                    continue
                if not said:
                    log.info(
                        "Model %r waits for a loaded model to finish its requests "
                        "(LOCAL_LLM_MAX_LOADED_MODELS=%d; loaded: %s)",
                        self._name_of(holder),
                        self.max_loaded,
                        ", ".join(m.name for m in others),
                    )
                    said = True
                time.sleep(_WAIT_STEP_S)
            yield

    def free_idle(self, holder: ModelHolder) -> bool:
        """Unload every idle model but ``holder``'s (a load ran out of memory); whether any was.

        Called inside ``admit``, on the loading thread."""
        freed = False
        for model in list(self.models.values()):
            if model.holder is not holder and model.loaded and model.idle:
                freed |= self._unload(model, f"to free memory for {self._name_of(holder)!r}")
        return freed

    def _unload(self, model: LocalModel, why: str) -> bool:
        marker: Release = model.engine.release()
        marker.done.wait()
        if marker.released:
            log.info("Unloaded %r %s", model.name, why)
        return marker.released

    def _name_of(self, holder: ModelHolder) -> str:
        return next((m.name for m in self.models.values() if m.holder is holder), "?")

    # ---- state ----------------------------------------------------------------------------------

    @property
    def loaded(self) -> list[str]:
        return [m.name for m in self.models.values() if m.loaded]

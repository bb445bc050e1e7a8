"""The Responses API with state and no database: ``store``, ``previous_response_id``, and
``GET``/``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``.

LiteLLM keeps Responses state only in its database, which this gateway does not have: without it,
``previous_response_id`` was silently ignored and ``GET /v1/responses/{id}`` was a 500. Here the
state lives in ``response_store`` (a SQLite file) for every model whose Responses LiteLLM serves
through chat completions: the local models (``zlocal/``), an ``openai/`` server with
``use_chat_completions_api: true``, and providers without a Responses API of their own (Anthropic,
Ollama, ...). A model that has the Responses API upstream (``openai/gpt-4o-mini``) keeps its state
with its provider, as before: its ids and ``previous_response_id`` pass through to it.

It is a LiteLLM callback (``litellm_settings.callbacks`` in ``proxy_config.yaml``) and three routes
(``routes.mount``):

- before the call, a ``previous_response_id`` that names a stored answer becomes items: the input
  items that answer was given (its own earlier turns included) and its output (messages, function
  calls, reasoning) come before the new ``input``, so the model sees the whole conversation and
  ``usage.input_tokens`` counts it. ``instructions`` are not carried over, as in OpenAI's API: each
  request gives its own. An id the store does not have is a 400 ``previous_response_not_found``.
- after it, the answer gets an id of the gateway's (``resp_`` and 48 hex digits, the same in every
  event of a stream), echoes ``previous_response_id`` and ``store``, and is stored (unless
  ``store`` is false) before the caller sees its end, so a ``GET`` right after finds it.
- a function call cut by the token limit is never reported ``completed``: a whole answer leaves it
  out (as the chat routes do), a stream, which has already sent its first pieces, ends it with
  ``status: "incomplete"`` and no ``function_call_arguments.done`` (docs/compatibility.md).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from litellm.integrations.custom_logger import CustomLogger

from custom_handlers.gateway import response_store
from custom_handlers.gateway.body_checks import CONFIG_FILE, LOCAL_PROVIDER, router
from custom_handlers.gateway.body_reader import RefusedBody
from custom_handlers.gateway.local_models import refuse_to_start
from custom_handlers.gateway.response_store import StoredResponse, StoreError, astore
from custom_handlers.inference.catalog import ConfigError, read_config

log = logging.getLogger("custom_handlers.responses_state")

CALLBACK = "custom_handlers.gateway.responses_state.responses_state"  # its name in the YAML
_CALL_TYPES = frozenset({"aresponses", "responses"})
_PLAN = "z_explorer_responses"  # the request's plan, in data["litellm_metadata"]
_OUR_ID = re.compile(r"resp_[0-9a-f]{48}")
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_KEPT = frozenset({"completed", "incomplete"})  # statuses of the answers stored
_MAX_PENDING = 4096  # requests in flight whose input items wait for their answer


def new_id() -> str:
    return f"resp_{secrets.token_hex(24)}"


def stored_id(response_id: str) -> str:
    """The id ``response_id`` stands for in the store.

    With LiteLLM's ``ResponsesIDSecurity`` on (a YAML without ``disable_responses_id_security``),
    callers get our ids encrypted; they are decrypted here so they work everywhere all the same.
    """
    if _OUR_ID.fullmatch(response_id):
        return response_id
    try:
        from litellm.proxy.hooks.responses_id_security import decrypted_response_id

        return decrypted_response_id(response_id)
    except Exception:  # not one of its ids: the id as given
        return response_id


# ---- which models keep their state here ---------------------------------------------------------


def keeps_state_here(model: Any) -> bool:
    """Whether every deployment of the model name ``model`` reaches its provider through chat
    completions (LiteLLM's Responses bridge), so its Responses state is the gateway's to keep."""
    if not isinstance(model, str):
        return False
    try:
        deployments = router().get_model_list(model_name=model) or []
    except Exception:  # the router's own lookup; unknown names are LiteLLM's to refuse
        return False
    return bool(deployments) and all(bridged(d.get("litellm_params") or {}) for d in deployments)


def bridged(params: Mapping[str, Any]) -> bool:
    """Whether LiteLLM answers a Responses request for this deployment through chat completions."""
    import litellm

    model = str(params.get("model") or "")
    if model.startswith(LOCAL_PROVIDER) or model.split("/", 1)[0] in litellm._custom_providers:
        return True
    try:
        from litellm.responses.main import provider_stores_the_conversation

        return not provider_stores_the_conversation(
            model, params.get("custom_llm_provider"), params
        )
    except Exception:  # a provider LiteLLM cannot place: leave it to LiteLLM, as before
        return False


# ---- items -------------------------------------------------------------------------------------


def _refusal(message: str, param: str | None, openai_code: str | None = None) -> RefusedBody:
    return RefusedBody(
        message=message,
        type="invalid_request_error",
        param=param,
        code=400,
        openai_code=openai_code,
    )


def input_items(value: Any) -> list[dict[str, Any]]:
    """The request's ``input`` as items, each with an ``id`` (``input_items`` lists them so)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise _refusal("'input' must be a string or an array of input items.", "input")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _refusal(f"input[{i}] must be an object, such as a message.", "input")
        item = dict(item)
        if "type" not in item and "role" in item:
            item["type"] = "message"
        if not isinstance(item.get("id"), str) or not item["id"]:
            prefix = "msg" if item.get("type") == "message" else "item"
            item["id"] = f"{prefix}_{secrets.token_hex(16)}"
        items.append(item)
    return items


def continuation(record: StoredResponse) -> list[dict[str, Any]]:
    """The items a follow-up to ``record`` starts with: what its model was given, then what it
    answered, less function calls cut by the token limit (no caller can answer those)."""
    output = [
        item
        for item in record.response.get("output") or []
        if isinstance(item, dict) and not _is_cut_call(item)
    ]
    return [*record.input_items, *output]


def _is_cut_call(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "function_call" and item.get("status") == "incomplete"


def _parses(arguments: Any) -> bool:
    try:
        json.loads(arguments)
    except (TypeError, ValueError):
        return False
    return True


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _set(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, dict):
        obj[name] = value
    else:
        setattr(obj, name, value)


def _event_type(event: Any) -> str:
    kind = _get(event, "type")
    return str(getattr(kind, "value", kind))


def _dump(response: Any) -> dict[str, Any]:
    if isinstance(response, dict):
        return json.loads(json.dumps(response, default=str))
    return json.loads(response.model_dump_json())


# ---- the callback ------------------------------------------------------------------------------


class ResponsesState(CustomLogger):
    def __init__(self) -> None:
        super().__init__()
        self._inputs: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        if call_type not in _CALL_TYPES:
            return data
        metadata = data.get("litellm_metadata")
        if isinstance(metadata, dict):
            metadata.pop(_PLAN, None)  # only this hook sets it, never the caller
        plan = await self._plan(data)
        if plan is not None:
            if not isinstance(metadata, dict):
                metadata = data["litellm_metadata"] = {}
            metadata[_PLAN] = plan
        return data

    async def _plan(self, data: dict) -> dict[str, Any] | None:
        store = data.get("store")
        if store is not None and not isinstance(store, bool):
            raise _refusal("'store' must be true or false.", "store")
        previous = data.get("previous_response_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise _refusal(
                "'previous_response_id' must be a response id (resp_...).", "previous_response_id"
            )
        here = keeps_state_here(data.get("model"))
        record = await astore("get", stored_id(previous)) if previous else None
        if previous and record is None and here:
            raise _refusal(
                f"Previous response with id '{previous}' not found. The gateway keeps a response "
                "created with store: true (the default) until it is deleted or expires "
                f"(general_settings.{response_store.SETTING} in proxy_config.yaml); one created "
                "with store: false is not kept.",
                "previous_response_id",
                openai_code="previous_response_not_found",
            )
        if not here and record is None:
            return None  # the provider keeps this conversation: LiteLLM passes it on
        given = data.get("input")
        items = [] if given is None and record is not None else input_items(given)
        if record is not None:
            items = [*continuation(record), *items]
            del data["previous_response_id"]  # answered here; LiteLLM would look in its database
        data["input"] = items
        if not here:  # a model with its provider's state, continuing a conversation of ours
            return None
        plan = {
            "id": new_id(),
            "previous_response_id": previous,
            "store": store is not False,
            "model": data.get("model"),
        }
        if plan["store"]:
            self._inputs[plan["id"]] = copy.deepcopy(items)
            while len(self._inputs) > _MAX_PENDING:
                self._inputs.popitem(last=False)
        return plan

    async def async_post_call_success_hook(self, data, user_api_key_dict, response):
        plan = _plan_of(data)
        if plan is None or _get(response, "output") is None:
            return response
        _present(response, plan)
        _leave_out_cut_calls(response)
        await self._keep(plan, response)
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict, response, request_data
    ) -> AsyncIterator[Any]:
        plan = _plan_of(request_data)
        if plan is None:
            async for event in response:
                yield event
            return
        stream = _Stream(plan)
        try:
            async for event in response:
                for out in stream.feed(event):
                    if _event_type(out) in _TERMINAL:
                        await self._keep(plan, _get(out, "response"))
                    yield out
            for out in stream.held:
                yield out
        finally:
            self._inputs.pop(plan["id"], None)

    async def async_post_call_failure_hook(
        self, request_data, original_exception, user_api_key_dict, traceback_str=None
    ):
        if (plan := _plan_of(request_data)) is not None:
            self._inputs.pop(plan["id"], None)
        return None

    async def _keep(self, plan: dict[str, Any], response: Any) -> None:
        """Store ``response`` if the request asked to and it is a finished answer."""
        items = self._inputs.pop(plan["id"], None)
        if not plan["store"] or items is None or response is None:
            return
        if _get(response, "status") not in _KEPT:
            return
        record = StoredResponse(
            id=plan["id"],
            model=str(plan["model"]),
            stored_at=time.time(),
            response=_dump(response),
            input_items=items,
        )
        try:
            await astore("put", record)
        except Exception:  # the answer still goes out; it cannot be looked up later
            log.exception(
                "Could not store response %s in %s", plan["id"], response_store.store().path
            )


def _plan_of(data: Any) -> dict[str, Any] | None:
    metadata = data.get("litellm_metadata") if isinstance(data, dict) else None
    plan = metadata.get(_PLAN) if isinstance(metadata, dict) else None
    return plan if isinstance(plan, dict) else None


def _present(response: Any, plan: Mapping[str, Any]) -> None:
    """The answer as the caller sees it: the gateway's id, and what the request said."""
    _set(response, "id", plan["id"])
    _set(response, "previous_response_id", plan["previous_response_id"])
    _set(response, "store", plan["store"])


def _leave_out_cut_calls(response: Any) -> None:
    """A whole answer cut by the token limit leaves out a function call cut with it (``_is_cut``),
    as the chat routes do; the local model's answers never hold one, a cloud model's may."""
    if _get(response, "status") != "incomplete":
        return
    output = list(_get(response, "output") or [])
    kept = [
        item for i, item in enumerate(output) if not _is_cut(item, last_item=i == len(output) - 1)
    ]
    if len(kept) != len(output):
        _set(response, "output", kept)


class _Stream:
    """One Responses stream's events, with the gateway's id, and its cut function call marked.

    LiteLLM's bridge sends every function call's ``function_call_arguments.done`` and
    ``output_item.done`` at the end, all as ``completed``, then the terminal event. From the first
    of them on, events are held until the terminal one says whether the answer was cut
    (``response.incomplete``); if it was, a call cut with it (``_is_cut``) ends ``incomplete``.
    """

    def __init__(self, plan: Mapping[str, Any]) -> None:
        self.plan = plan
        self.items: dict[int, tuple[str, Any]] = {}  # output_index -> (item type, id) announced
        self.held: list[Any] = []

    def feed(self, event: Any) -> list[Any]:
        kind = _event_type(event)
        if (response := _get(event, "response")) is not None:
            _present(response, self.plan)
        if kind == "response.output_item.added":
            index, item = _get(event, "output_index"), _get(event, "item")
            if isinstance(index, int):
                self.items[index] = (str(_get(item, "type")), _get(item, "id"))
        if kind in _TERMINAL:
            out, self.held = [*self._settled(event), event], []
            return out
        if self.held or self._closes_a_call(kind, event):
            self.held.append(event)
            return []
        return [event]

    @staticmethod
    def _closes_a_call(kind: str, event: Any) -> bool:
        if kind == "response.function_call_arguments.done":
            return True
        return (
            kind == "response.output_item.done"
            and _get(_get(event, "item"), "type") == "function_call"
        )

    def _settled(self, terminal: Any) -> list[Any]:
        """The held events, each cut call's ``output_item.done`` made ``incomplete`` (and the call
        in the terminal event's output too), its ``function_call_arguments.done`` dropped."""
        if _event_type(terminal) != "response.incomplete":
            return self.held
        last = max(self.items, default=None)
        cut = {
            _get(event, "output_index")
            for event in self.held
            if _event_type(event) == "response.output_item.done"
            and _is_cut(_get(event, "item"), last_item=_get(event, "output_index") == last)
        }
        if not cut:
            return self.held
        kept = []
        for event in self.held:
            if _get(event, "output_index") in cut:
                if _event_type(event) == "response.function_call_arguments.done":
                    continue
                _set(_get(event, "item"), "status", "incomplete")
            kept.append(event)
        cut_ids = {self.items[index][1] for index in cut if index in self.items}
        for item in _get(_get(terminal, "response"), "output") or []:
            if _get(item, "type") == "function_call" and _get(item, "id") in cut_ids:
                _set(item, "status", "incomplete")
        return kept


def _is_cut(item: Any, *, last_item: bool) -> bool:
    """Whether a function call of an answer cut by the token limit was cut itself: its arguments
    do not parse (JSON cut short never does), or it is the answer's last item and has none
    (LiteLLM reports a call cut before its first argument as ``{}``)."""
    if _get(item, "type") != "function_call":
        return False
    arguments = _get(item, "arguments")
    if not _parses(arguments):
        return True
    return last_item and str(arguments).strip() in ("", "{}")


responses_state = ResponsesState()


# ---- start-up ---------------------------------------------------------------------------------


def open_store(config_path: str | None) -> None:
    """At the proxy's start: the store's settings from ``proxy_config.yaml``, and its file opened.

    A wrong setting or a file that cannot be used stops the gateway with one line naming it; so
    does nothing else here. A configuration without the callback gets a warning: its Responses
    answers would not be stored nor chained.
    """
    config: dict = {}
    if config_path:
        try:
            config = read_config(config_path)
        except ConfigError:
            return  # the proxy reports a configuration it cannot read
    try:
        settings = response_store.settings_in(config)
    except ValueError as exc:
        refuse_to_start(str(exc))
        return
    store = response_store.configure(settings)
    try:
        store.open()
    except StoreError as exc:
        refuse_to_start(f"the Responses store cannot be opened: {exc}")
        return
    callbacks = (config.get("litellm_settings") or {}).get("callbacks") or []
    if CALLBACK not in callbacks:
        log.warning(
            "litellm_settings.callbacks in %s lacks %s: Responses answers are not stored, and "
            "previous_response_id is not honoured on local models (docs/compatibility.md)",
            CONFIG_FILE,
            CALLBACK,
        )


# ---- the routes --------------------------------------------------------------------------------


def _not_found(response_id: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": f"Response with id '{response_id}' not found.",
                "type": "invalid_request_error",
                "param": "response_id",
                "code": "response_not_found",
            }
        },
        status_code=404,
    )


def _bad_query(message: str, param: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        status_code=400,
    )


def _providers_id(response_id: str) -> bool:
    """Whether ``response_id`` is LiteLLM's id of an answer kept by its provider (a model with the
    Responses API upstream): LiteLLM's own route asks that provider for it."""
    try:
        from litellm.responses.utils import ResponsesAPIRequestUtils

        decoded = ResponsesAPIRequestUtils.decode_responses_api_response_id(stored_id(response_id))
        model_id = decoded.get("model_id")
        if not decoded.get("custom_llm_provider") or not model_id:
            return False
        deployment = router().get_deployment(model_id=model_id)
    except Exception:
        return False
    if deployment is None:
        return False
    params = deployment.litellm_params.model_dump(exclude_none=True)
    return not bridged(params)


def state_routes(prefixes: tuple[str, ...] = ("/v1", "")) -> list[APIRoute]:
    """``GET``/``DELETE {prefix}/responses/{id}`` and ``GET {prefix}/responses/{id}/input_items``;
    an id the store lacks that LiteLLM issued for a provider-kept answer goes to LiteLLM's route."""
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth
    from litellm.proxy.response_api_endpoints import endpoints as litellm_routes

    auth = Depends(user_api_key_auth)

    async def retrieve(response_id: str, request: Request, user_api_key_dict=auth):
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            return _bad_query(
                "'stream' is not supported when retrieving a stored response.", "stream"
            )
        record = await astore("get", stored_id(response_id))
        if record is not None:
            return JSONResponse(record.response)
        if _providers_id(response_id):
            return await _at_provider(
                litellm_routes.get_response, response_id, request, user_api_key_dict
            )
        return _not_found(response_id)

    async def delete(response_id: str, request: Request, user_api_key_dict=auth):
        if await astore("delete", stored_id(response_id)):
            return {"id": response_id, "object": "response", "deleted": True}
        if _providers_id(response_id):
            return await _at_provider(
                litellm_routes.delete_response, response_id, request, user_api_key_dict
            )
        return _not_found(response_id)

    async def items(response_id: str, request: Request, user_api_key_dict=auth):
        record = await astore("get", stored_id(response_id))
        if record is None:
            if _providers_id(response_id):
                return await _at_provider(
                    litellm_routes.get_response_input_items, response_id, request, user_api_key_dict
                )
            return _not_found(response_id)
        return list_page(record.input_items, request.query_params)

    async def _at_provider(route, response_id: str, request: Request, user_api_key_dict):
        """LiteLLM's own route for an id its provider keeps (a model with the Responses API)."""
        return await route(
            response_id=response_id,
            request=request,
            fastapi_response=_plain_response(),
            user_api_key_dict=user_api_key_dict,
        )

    routes = []
    for prefix in prefixes:
        path = f"{prefix}/responses/{{response_id}}"
        routes += [
            APIRoute(path, retrieve, methods=["GET"]),
            APIRoute(path, delete, methods=["DELETE"]),
            APIRoute(f"{path}/input_items", items, methods=["GET"]),
        ]
    return routes


def _plain_response():
    from fastapi import Response

    return Response()


def list_page(items: list[dict[str, Any]], query: Mapping[str, str]) -> Any:
    """OpenAI's list of input items: ``limit`` (1-100, 20), ``order`` (``desc``), ``after``,
    ``before``; each item in OpenAI's shape (a message's text content as a list of parts)."""
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        return _bad_query(
            f"'limit' must be a whole number from 1 to 100, got {raw_limit!r}.", "limit"
        )
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        return _bad_query(f"'order' must be 'asc' or 'desc', got {order!r}.", "order")
    listed = [_listed(item) for item in items]
    if order == "desc":
        listed.reverse()
    ids = [item.get("id") for item in listed]
    for param in ("after", "before"):
        cursor = query.get(param)
        if cursor is None:
            continue
        if cursor not in ids:
            return _bad_query(f"'{param}': no item with id {cursor!r} in this list.", param)
        at = ids.index(cursor)
        listed, ids = (
            (listed[at + 1 :], ids[at + 1 :]) if param == "after" else (listed[:at], ids[:at])
        )
    page = listed[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(listed) > limit,
    }


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's string content becomes a list of parts."""
    content = item.get("content")
    if item.get("type") != "message" or not isinstance(content, str):
        return item
    part = "output_text" if item.get("role") == "assistant" else "input_text"
    return {**item, "content": [{"type": part, "text": content}]}

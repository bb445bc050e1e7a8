"""The Responses API with state and no database (``gateway/responses_state``, ``response_store``).

``store`` (default true), ``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items`` on the local model and on a cloud model LiteLLM bridges
through chat completions (``use_chat_completions_api: true`` on the fake upstream's chat-only
path); an ``openai/`` model with the Responses API upstream keeps its state with the provider.
A streamed function call cut by ``max_output_tokens`` never ends ``completed`` with arguments that
do not parse. The store survives a restart and holds its bounds (``response_store``'s own tests
first, then the real gateway through the ``openai`` SDK).
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time

import httpx
import openai
import pytest
import yaml
from openai import OpenAI

from custom_handlers.gateway.response_store import (
    ResponseStore,
    StoredResponse,
    StoreError,
    StoreSettings,
    settings_from,
)
from custom_handlers.gateway.responses_state import _Stream, list_page
from tests.servers import CONFIG, Gateway

OUR_ID = re.compile(r"resp_[0-9a-f]{48}")
BRIDGED = "chat-only-bridged"
LOCAL = "qwen3-4b"
PICK = {  # a function whose call ends within a few tokens: an enum argument
    "type": "function",
    "name": "pick_size",
    "description": "Pick a size.",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"size": {"type": "string", "enum": ["small", "big"]}},
        "required": ["size"],
        "additionalProperties": False,
    },
}
DRAW = {  # one whose call runs long: a free string
    "type": "function",
    "name": "draw",
    "description": "Draw a picture.",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"prompt": {"type": "string"}},
        "required": ["prompt"],
        "additionalProperties": False,
    },
}


# ---- the store's file ----------------------------------------------------------------------------


def _record(response_id: str, stored_at: float | None = None, text: str = "hi") -> StoredResponse:
    return StoredResponse(
        id=response_id,
        model="m",
        stored_at=time.time() if stored_at is None else stored_at,
        response={"id": response_id, "status": "completed", "output": [], "text": text},
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": text}],
    )


def test_settings_default_and_refuse_what_they_cannot_use():
    assert settings_from({}) == StoreSettings()
    assert str(StoreSettings().path) == ".gateway/responses.sqlite3"
    assert StoreSettings().max_responses == 10_000 and StoreSettings().max_age_days == 30
    custom = settings_from({"responses_store": {"path": "x/y.db", "max_responses": 5}})
    assert (str(custom.path), custom.max_responses) == ("x/y.db", 5)
    bad = [
        ({"responses_store": "yes"}, "general_settings.responses_store must be a mapping"),
        ({"responses_store": {"max_responses": 0}}, "max_responses must be a whole number"),
        ({"responses_store": {"max_responses": True}}, "max_responses must be a whole number"),
        ({"responses_store": {"max_age_days": -1}}, "max_age_days must be a number above 0"),
        ({"responses_store": {"max_age_days": ".5"}}, "max_age_days must be a number above 0"),
        ({"responses_store": {"path": ""}}, "path must be a file path"),
        ({"responses_store": {"max_count": 3}}, "responses_store.max_count is not a setting"),
    ]
    for general_settings, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            settings_from(general_settings)


def test_the_file_is_owner_only_and_survives_a_reopen(tmp_path):
    path = tmp_path / "state" / "responses.sqlite3"
    store = ResponseStore(StoreSettings(path=path))
    store.put(_record("resp_a"))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for file in path.parent.iterdir():  # the database and its WAL files
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    store.close()
    again = ResponseStore(StoreSettings(path=path))
    assert again.get("resp_a").response["id"] == "resp_a"
    assert again.get("resp_b") is None


def test_the_count_bound_evicts_the_oldest(tmp_path):
    store = ResponseStore(StoreSettings(path=tmp_path / "r.db", max_responses=3))
    for i in range(5):
        store.put(_record(f"resp_{i}"))
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [False] * 2 + [True] * 3
    assert store.count() == 3


def test_the_age_bound_hides_old_answers_at_once_and_removes_them(tmp_path):
    store = ResponseStore(StoreSettings(path=tmp_path / "r.db", max_age_days=1))
    two_days_ago = time.time() - 2 * 86_400
    store.put(_record("resp_old", stored_at=two_days_ago))
    assert store.get("resp_old") is None  # past the age, even before it leaves the file
    assert not store.delete("resp_old")
    store.put(_record("resp_new"))  # each write drops what is past the age
    assert store.get("resp_new") is not None
    assert store.count() == 1


def test_concurrent_writers_and_readers(tmp_path):
    store = ResponseStore(StoreSettings(path=tmp_path / "r.db", max_responses=1000))
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                store.put(_record(f"resp_{worker}_{i}", text="x" * i))
                assert store.get(f"resp_{worker}_{i}").response["text"] == "x" * i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.count() == 320


def test_a_file_that_is_not_a_store_is_refused_by_name(tmp_path):
    path = tmp_path / "responses.sqlite3"
    path.write_bytes(b"not a database, not at all" * 100)
    with pytest.raises(StoreError, match=re.escape(str(path))):
        ResponseStore(StoreSettings(path=path)).open()


def test_input_items_pages_as_openai_lists_them():
    items = [
        {"id": f"msg_{i}", "type": "message", "role": "user", "content": f"t{i}"} for i in range(5)
    ]
    page = list_page(items, {})
    assert [item["id"] for item in page["data"]] == ["msg_4", "msg_3", "msg_2", "msg_1", "msg_0"]
    assert page["data"][0]["content"] == [{"type": "input_text", "text": "t4"}]
    page = list_page(items, {"order": "asc", "limit": "2", "after": "msg_1"})
    assert [item["id"] for item in page["data"]] == ["msg_2", "msg_3"]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("msg_2", "msg_3", True)
    for query, param in (
        ({"limit": "0"}, "limit"),
        ({"order": "up"}, "order"),
        ({"after": "x"}, "after"),
    ):
        answer = list_page(items, query)
        assert answer.status_code == 400
        assert json.loads(answer.body)["error"]["param"] == param


def _call(index: int, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": f"fc_{index}",
        "call_id": f"c{index}",
        "name": "f",
        "arguments": arguments,
        "status": status,
    }


def _events(arguments: list[str], terminal: str) -> list[dict]:
    """What LiteLLM's bridge streams for these calls: each announced, then, at the end, each one's
    ``function_call_arguments.done`` and ``output_item.done`` (all ``completed``), then the end."""
    events = [{"type": "response.created", "response": {"id": "resp_litellm", "output": []}}]
    for i in range(len(arguments)):
        item = _call(i, "", "in_progress")
        events.append({"type": "response.output_item.added", "output_index": i, "item": item})
    for i, args in enumerate(arguments):
        kind = "response.function_call_arguments.done"
        events.append({"type": kind, "output_index": i, "arguments": args})
        item = _call(i, args)
        events.append({"type": "response.output_item.done", "output_index": i, "item": item})
    output = [_call(i, args) for i, args in enumerate(arguments)]
    response = {"id": "resp_litellm", "status": "x", "output": output}
    events.append({"type": terminal, "response": response})
    return events


@pytest.mark.parametrize(
    "arguments, terminal, cut",
    [
        (['{"a": 1}', '{"b": "x'], "response.incomplete", {1}),  # cut inside the second call
        (['{"a": 1}', "{}"], "response.incomplete", {1}),  # cut before its first argument
        (['{"a": 1}'], "response.incomplete", set()),  # cut after the call
        (["{}", '{"a": 1}'], "response.incomplete", set()),  # an empty call before the last
        (['{"a": 1}', '{"b": "x'], "response.completed", set()),  # not cut: passed on as sent
    ],
)
def test_a_stream_marks_the_calls_the_limit_cut(arguments, terminal, cut):
    plan = {"id": "resp_" + "0" * 48, "previous_response_id": None, "store": True}
    stream = _Stream(plan)
    out = [event for raw in _events(arguments, terminal) for event in stream.feed(raw)]
    assert {e["response"]["id"] for e in out if "response" in e} == {plan["id"]}
    done = {e["output_index"]: e["item"]["status"] for e in out if e["type"].endswith("item.done")}
    assert {i for i, status in done.items() if status == "incomplete"} == cut
    assert len(done) == len(arguments)  # every announced item is closed
    finished = {e["output_index"] for e in out if e["type"].endswith("arguments.done")}
    assert finished == set(range(len(arguments))) - cut
    final = out[-1]["response"]["output"]
    assert {i for i, item in enumerate(final) if item["status"] == "incomplete"} == cut


# ---- the real gateway ---------------------------------------------------------------------------

STORE_PATH = "state/responses.sqlite3"  # relative: from the gateway's working directory


def _write_config(work, fake_openai, **store) -> object:
    config = yaml.safe_load(CONFIG.read_text())
    config["model_list"].append(
        {
            "model_name": BRIDGED,
            "litellm_params": {
                "model": "openai/my-model",
                "api_base": fake_openai.chat_only_base_url,
                "use_chat_completions_api": True,
            },
        }
    )
    config["general_settings"]["responses_store"] = {"path": STORE_PATH, **store}
    path = work / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def state_gateway(fake_openai, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("responses-state")
    config = _write_config(work, fake_openai, max_responses=1000)
    gw = Gateway(env=fake_openai.gateway_env(str(tiny_model_dir)), workdir=work, config=config)
    yield gw.start()
    gw.stop()


@pytest.fixture
def sdk(state_gateway) -> OpenAI:
    return OpenAI(
        base_url=f"{state_gateway.base_url}/v1",
        api_key=state_gateway.key,
        max_retries=0,
        timeout=120,
    )


def _text(content) -> str:
    """A chat message's text: its string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def _upstream_chats(fake_openai, since: int) -> list[dict]:
    return [
        r["body"] for r in fake_openai.requests[since:] if r["path"].endswith("/chat/completions")
    ]


@pytest.mark.integration
def test_previous_response_id_puts_the_earlier_turns_in_the_request(sdk):
    first = sdk.responses.create(model=LOCAL, input="a fox", max_output_tokens=8)
    assert OUR_ID.fullmatch(first.id) and first.store is True
    second = sdk.responses.create(
        model=LOCAL, input="and a hare", previous_response_id=first.id, max_output_tokens=4
    )
    assert OUR_ID.fullmatch(second.id) and second.id != first.id
    assert second.previous_response_id == first.id
    # The same conversation as chat messages costs exactly as many prompt tokens.
    chat = sdk.chat.completions.create(
        model=LOCAL,
        messages=[
            {"role": "user", "content": "a fox"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "and a hare"},
        ],
        max_tokens=1,
    )
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    alone = sdk.responses.create(model=LOCAL, input="and a hare", max_output_tokens=1, store=False)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens


@pytest.mark.integration
def test_a_bridged_cloud_model_gets_the_conversation_and_not_the_old_instructions(sdk, fake_openai):
    first = sdk.responses.create(model=BRIDGED, input="a fox", instructions="Speak as a poet.")
    assert first.output_text == "echo: a fox" and OUR_ID.fullmatch(first.id)
    seen = len(fake_openai.requests)
    second = sdk.responses.create(model=BRIDGED, input="a hare", previous_response_id=first.id)
    assert second.output_text == "echo: a hare"
    [sent] = _upstream_chats(fake_openai, seen)
    # OpenAI's rule: a follow-up's instructions are its own; the earlier ones are not carried.
    assert [(m["role"], _text(m["content"])) for m in sent["messages"]] == [
        ("user", "a fox"),
        ("assistant", "echo: a fox"),
        ("user", "a hare"),
    ]
    assert "previous_response_id" not in sent
    third = sdk.responses.create(
        model=BRIDGED, input="a bee", previous_response_id=second.id, instructions="Be brief."
    )
    [sent] = _upstream_chats(fake_openai, seen + 1)
    assert (sent["messages"][0]["role"], _text(sent["messages"][0]["content"])) == (
        "system",
        "Be brief.",
    )
    assert len(sent["messages"]) == 6  # system, then three user turns and two answers
    assert third.instructions == "Be brief."


@pytest.mark.integration
def test_a_function_call_and_its_output_carry_over(sdk):
    first = sdk.responses.create(
        model=LOCAL,
        input="pick a size",
        tools=[PICK],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert json.loads(call.arguments)["size"] in ("small", "big")
    second = sdk.responses.create(
        model=LOCAL,
        previous_response_id=first.id,
        tools=[PICK],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "big"}],
        max_output_tokens=4,
    )
    assert second.usage.input_tokens > first.usage.input_tokens
    items = sdk.responses.input_items.list(second.id, order="asc").data
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == items[2].call_id == call.call_id


@pytest.mark.integration
def test_retrieve_delete_and_input_items(sdk):
    first = sdk.responses.create(model=LOCAL, input="a fox", max_output_tokens=6)
    second = sdk.responses.create(
        model=LOCAL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "a hare"}]}],
        previous_response_id=first.id,
        max_output_tokens=6,
    )
    got = sdk.responses.retrieve(second.id)
    assert got.model_dump() == second.model_dump()

    items = sdk.responses.input_items.list(second.id)  # newest first, as OpenAI lists them
    assert [(i.type, i.role) for i in items.data] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert items.data[0].content[0].text == "a hare"
    assert items.data[2].content[0].text == "a fox"
    assert len({i.id for i in items.data}) == 3
    paged = list(sdk.responses.input_items.list(second.id, limit=1, order="asc"))
    assert [i.id for i in paged] == [i.id for i in reversed(items.data)]

    assert sdk.responses.delete(first.id) is None  # the SDK returns nothing for a deletion
    with pytest.raises(openai.NotFoundError) as gone:
        sdk.responses.retrieve(first.id)
    assert gone.value.body["code"] == "response_not_found" and first.id in gone.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model=LOCAL, input="more", previous_response_id=first.id)
    assert refused.value.body["code"] == "previous_response_not_found"
    assert refused.value.body["param"] == "previous_response_id"
    # The later turn holds the whole conversation: deleting an earlier one does not break it.
    third = sdk.responses.create(
        model=LOCAL, input="a bee", previous_response_id=second.id, max_output_tokens=2
    )
    assert len(sdk.responses.input_items.list(third.id).data) == 5


@pytest.mark.integration
@pytest.mark.parametrize("model", [LOCAL, BRIDGED])
def test_store_false_is_neither_retrievable_nor_chainable(sdk, model):
    answer = sdk.responses.create(model=model, input="a fox", max_output_tokens=4, store=False)
    assert answer.store is False and OUR_ID.fullmatch(answer.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(answer.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_items.list(answer.id)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model=model, input="more", previous_response_id=answer.id)
    assert "store: false" in refused.value.message
    streamed = list(
        sdk.responses.create(
            model=model, input="a fox", max_output_tokens=4, store=False, stream=True
        )
    )
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(streamed[-1].response.id)


@pytest.mark.integration
@pytest.mark.parametrize("model", [LOCAL, BRIDGED])
def test_a_streamed_answer_has_one_id_and_is_stored_by_its_end(sdk, model):
    first = sdk.responses.create(model=model, input="a fox", max_output_tokens=4)
    events = list(
        sdk.responses.create(
            model=model,
            input="a hare",
            previous_response_id=first.id,
            max_output_tokens=4,
            stream=True,
        )
    )
    ids = {event.response.id for event in events if hasattr(event, "response")}
    [response_id] = ids
    assert OUR_ID.fullmatch(response_id)
    final = events[-1].response
    assert final.previous_response_id == first.id and final.store is True
    got = sdk.responses.retrieve(response_id)  # right after the last event: already stored
    assert got.status == final.status and got.output_text == final.output_text
    assert len(sdk.responses.input_items.list(response_id).data) == 3


@pytest.mark.integration
def test_unknown_ids_and_bad_values_are_openai_shaped_4xx(state_gateway):
    headers = {"Authorization": f"Bearer {state_gateway.key}"}
    base = state_gateway.base_url
    for method, path in (
        ("GET", "/v1/responses/resp_nothing_here"),
        ("DELETE", "/v1/responses/resp_nothing_here"),
        ("GET", "/v1/responses/resp_nothing_here/input_items"),
        ("GET", "/responses/resp_nothing_here"),
    ):
        answer = httpx.request(method, base + path, headers=headers, timeout=30)
        assert answer.status_code == 404, (method, path, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "response_not_found" and "resp_nothing_here" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{base}/v1/responses/resp_x", timeout=30).status_code == 401
    for body, param in (
        ({"previous_response_id": 12}, "previous_response_id"),
        ({"previous_response_id": "resp_nothing_here"}, "previous_response_id"),
        ({"store": "yes"}, "store"),
    ):
        answer = httpx.post(
            f"{base}/v1/responses",
            json={"model": LOCAL, "input": "a fox", **body},
            headers=headers,
            timeout=60,
        )
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == param


@pytest.mark.integration
def test_a_model_with_the_responses_api_upstream_keeps_its_own_state(sdk, fake_openai):
    kept = set(fake_openai.stored_responses)
    first = sdk.responses.create(model="gpt-4o-mini", input="a fox")
    assert not OUR_ID.fullmatch(first.id)  # LiteLLM's id, which names the deployment
    [upstream_id] = set(fake_openai.stored_responses) - kept  # the provider's own id
    seen = len(fake_openai.requests)
    sdk.responses.create(model="gpt-4o-mini", input="a hare", previous_response_id=first.id)
    [sent] = [r["body"] for r in fake_openai.requests[seen:] if r["path"].endswith("/responses")]
    assert sent["previous_response_id"] == upstream_id  # passed on, as the provider's own id
    assert sent["input"] == "a hare"


@pytest.mark.integration
def test_a_streamed_function_call_cut_by_the_limit_never_ends_completed(sdk):
    """The openai SDK's stream helper, over many limits: no JSONDecodeError, and every function
    call it is told is ``completed`` has arguments that parse."""
    statuses: dict[str, int] = {}
    for tools in ([PICK], [DRAW]):
        for limit in range(6, 53, 4):
            with sdk.responses.stream(
                model=LOCAL,
                input="pick a size and draw it",
                tools=tools,
                tool_choice="required",
                max_output_tokens=limit,
                temperature=0,
            ) as stream:
                events = list(stream)
            final = events[-1].response
            done = [
                e.item
                for e in events
                if e.type == "response.output_item.done" and e.item.type == "function_call"
            ]
            for item in done + [o for o in final.output if o.type == "function_call"]:
                statuses[item.status] = statuses.get(item.status, 0) + 1
                if item.status == "completed":
                    json.loads(item.arguments)
            arguments_done = [
                e for e in events if e.type == "response.function_call_arguments.done"
            ]
            for event in arguments_done:
                json.loads(event.arguments)  # only a call whose arguments are whole gets one
            stored = sdk.responses.retrieve(final.id)
            assert [o.status for o in stored.output] == [o.status for o in final.output]
            if limit % 8 != 6:
                continue
            whole = sdk.responses.create(
                model=LOCAL,
                input="pick a size and draw it",
                tools=tools,
                tool_choice="required",
                max_output_tokens=limit,
                temperature=0,
                store=False,
            )
            for item in whole.output:  # a whole answer leaves a cut call out
                if item.type == "function_call":
                    assert item.status == "completed"
                    json.loads(item.arguments)
    print("function call statuses:", statuses)
    assert statuses.get("incomplete", 0) > 0, statuses  # the case the test is about happened
    assert set(statuses) <= {"completed", "incomplete"}, statuses


@pytest.mark.integration
def test_the_store_survives_a_restart_and_keeps_its_count_bound(state_gateway, fake_openai, sdk):
    """Stop the gateway and start it again on the same folder, with a lower ``max_responses``:
    the newest answers are still there, the older ones went at start, and the bound holds."""
    older = sdk.responses.create(model=BRIDGED, input="the oldest")
    newest = [sdk.responses.create(model=BRIDGED, input=f"turn {i}") for i in range(3)]
    store = state_gateway.workdir / STORE_PATH
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700

    state_gateway.stop()
    state_gateway.config = _write_config(state_gateway.workdir, fake_openai, max_responses=3)
    state_gateway.start()

    for answer in newest:
        assert sdk.responses.retrieve(answer.id).output_text == answer.output_text
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(older.id)
    follow_up = sdk.responses.create(
        model=BRIDGED, input="again", previous_response_id=newest[-1].id
    )
    assert len(sdk.responses.input_items.list(follow_up.id).data) == 3
    with pytest.raises(openai.NotFoundError):  # the oldest of the three made room
        sdk.responses.retrieve(newest[0].id)
    assert sdk.responses.retrieve(newest[1].id).id == newest[1].id
    assert os.path.exists(store)

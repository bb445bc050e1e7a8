"""The gateway as a hostile caller meets it: only the routes it serves answer, and no answer, on
any route, carries a traceback, a file path, an object address or any part of a key.

The route table is LiteLLM's own, read at test time from the installed version (``ROUTE_TABLE``),
so a LiteLLM upgrade that mounts new routes is checked too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from custom_handlers.gateway.surface import allowed_methods, open_route
from tests.servers import FAKE_OPENAI_KEY, ROOT, Gateway

pytestmark = pytest.mark.integration

LOCAL = "qwen3-4b"
CLOUD = "gpt-4o-mini"
FOX = [{"role": "user", "content": "a fox"}]
WRONG_KEY = "sk-wrong-key-987654"

# What an answer must never carry (docs/security.md, "No internals in any answer").
LEAKS = {
    "traceback": re.compile(r"Traceback \(most recent call last\)|\bFile \"|stack trace:"),
    "file path": re.compile(
        r"(?<![\w:/.])/(?:home|root|usr|opt|tmp|var|etc|work|srv|lib|proc)/[^\s\"']+|site-packages"
    ),
    "object address": re.compile(r" at 0x[0-9a-fA-F]+"),
    "masked key": re.compile(r"[\w-]{1,8}\*{3,}[\w-]{1,8}"),
}

ROUTE_TABLE = r"""
import json, os
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
from litellm.proxy.proxy_server import app

def table(routes, prefix=""):
    for route in routes:
        if hasattr(route, "original_router"):
            yield from table(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "path"):
            yield prefix + route.path, sorted(getattr(route, "methods", None) or ["GET"])

print(json.dumps(sorted({(p, m) for p, ms in table(app.routes) for m in ms})))
"""


@pytest.fixture(scope="module")
def route_table() -> list[tuple[str, str]]:
    """Every (path, method) LiteLLM's app mounts, with sample values for path parameters."""
    out = subprocess.run(
        [sys.executable, "-c", ROUTE_TABLE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    ).stdout
    pairs = {(re.sub(r"\{[^}]+\}", "x", path), method) for path, method in json.loads(out)}
    pairs |= {("/local/state", "GET"), ("/local/release", "POST"), ("/health", "GET")}
    assert len(pairs) > 600, len(pairs)  # LiteLLM 1.108 mounts about 970
    return sorted(pairs)


# Fields of a successful answer that carry the model's own words: a random-weight model can write
# anything there ("forrue****F" once matched "masked key"), so the patterns skip them.
WRITTEN = {"content", "text", "output_text", "arguments", "refusal", "reasoning_content", "delta"}


def _without_written(value):
    if isinstance(value, dict):
        return {k: "" if k in WRITTEN else _without_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_written(v) for v in value]
    return value


def _scanned(r: httpx.Response) -> str:
    """The body as the patterns see it: a 2xx JSON answer, or each JSON event of a 2xx stream,
    without what the model wrote."""
    kind = r.headers.get("content-type", "")
    if r.status_code >= 400 or not kind.startswith(("application/json", "text/event-stream")):
        return r.text
    lines = r.text.splitlines() if kind.startswith("text/event-stream") else [r.text]
    out = []
    for line in lines:
        head, body = ("data: ", line[6:]) if line.startswith("data: ") else ("", line)
        try:
            out.append(head + json.dumps(_without_written(json.loads(body))))
        except ValueError:  # not JSON ("data: [DONE]", "event: ..."): as it is
            out.append(line)
    return "\n".join(out)


def assert_clean(r: httpx.Response, *secrets: str) -> None:
    """No internals in the answer: its body (but what the model wrote) and its headers."""
    text = _scanned(r) + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    for what, pattern in LEAKS.items():
        assert not pattern.search(text), (what, r.request.method, r.request.url, text[:1500])
    text = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    for secret in (*secrets, FAKE_OPENAI_KEY):
        assert secret not in text, (r.request.url, text[:500])


def assert_error_shape(r: httpx.Response) -> dict:
    body = r.json()
    if r.request.url.path.startswith("/v1/messages"):  # Anthropic's shape there
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    return body["error"]


_HTTP = httpx.Client(timeout=120)  # one pool of kept-alive connections for the whole module


def send(gateway: Gateway, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return _HTTP.request(method, gateway.base_url + path, headers=headers, **kwargs)


# ---- the surface --------------------------------------------------------------------------------


def test_every_route_of_the_app_is_open_or_a_404(gateway, route_table):
    """Each (path, method) of LiteLLM's route table, with and without the key."""
    opened = []
    for path, method in route_table:
        if method in ("HEAD", "OPTIONS"):
            continue
        route = open_route(path)
        body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
        for key in (None, gateway.key):
            r = send(gateway, method, path, key, **body)
            assert_clean(r, gateway.key)
            if route is None:
                assert r.status_code == 404, (method, path, r.status_code, r.text[:300])
                assert assert_error_shape(r)["code"] == "unknown_url"
            elif method not in allowed_methods(path):
                assert r.status_code == 405, (method, path, r.status_code, r.text[:300])
            elif key is None and route.key:
                assert r.status_code == 401, (method, path, r.status_code, r.text[:300])
            else:
                assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
                opened.append(f"{method} {path}")
        assert not r.status_code >= 500, (method, path, r.text[:300])
    assert "POST /v1/chat/completions" in opened and "GET /health/liveliness" in opened


@pytest.mark.parametrize(
    "path",
    [
        "/openapi.json",
        "/redoc",
        "/docs",
        "/ui/",
        "/public/providers",
        "/sso/key/generate",
        "/langfuse/api/public/ingestion",
        "/key/info",
        "/user/info",
        "/v1/batches",
        "/v1/files/x",
        "/v1/assistants",
        "/v1/chat/completions/../../openapi.json",
        "//openapi.json",
        "/",
    ],
)
@pytest.mark.parametrize("key", [False, True], ids=["no key", "key"])
def test_routes_the_gateway_does_not_serve_are_404(gateway, path, key):
    for method in ("GET", "POST"):
        r = send(gateway, method, path, gateway.key if key else None, json={})
        assert r.status_code == 404, (method, path, r.text[:300])
        assert_error_shape(r)
        assert_clean(r, gateway.key)


def test_logins_cannot_be_locked_by_strangers(gateway):
    for _ in range(8):
        r = send(gateway, "POST", "/login", None, data={"username": "admin", "password": "x"})
        assert r.status_code == 404
    for path in ("/v2/login", "/register", "/api/event_logging/batch"):
        assert send(gateway, "POST", path, None, json={}).status_code == 404


def test_cors_allows_no_origin_by_default(gateway):
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = send(gateway, "OPTIONS", "/v1/chat/completions", None, headers=origin)
    assert "access-control-allow-origin" not in preflight.headers
    r = send(
        gateway,
        "POST",
        "/v1/chat/completions",
        gateway.key,
        headers={"Origin": "http://evil.example"},
        json={"model": LOCAL, "messages": FOX, "max_tokens": 1},
    )
    assert r.status_code == 200, r.text
    assert not any(name.startswith("access-control-") for name in r.headers)


@pytest.fixture(scope="module")
def admin_gateway(tiny_model_dir, fake_openai, tmp_path_factory):
    """A gateway whose operator opened LiteLLM's admin surface and allowed one origin."""
    work = tmp_path_factory.mktemp("admin-gateway")
    config = work / "proxy_config.yaml"
    text = (ROOT / "proxy_config.yaml").read_text()
    config.write_text(
        text.replace("general_settings:\n", "general_settings:\n  gateway_admin_routes: true\n", 1)
    )
    gw = Gateway(
        env=fake_openai.gateway_env(
            str(tiny_model_dir), LITELLM_CORS_ORIGINS="http://allowed.example"
        ),
        workdir=work,
        config=config,
    )
    gw.start()
    yield gw
    gw.stop()


def test_the_admin_surface_and_an_origin_open_with_one_setting_each(admin_gateway):
    gw = admin_gateway
    assert send(gw, "GET", "/openapi.json", None).status_code == 200
    allowed = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"}
    preflight = send(gw, "OPTIONS", "/v1/chat/completions", None, headers=allowed)
    assert preflight.headers.get("access-control-allow-origin") == "http://allowed.example"
    other = {**allowed, "Origin": "http://evil.example"}
    preflight = send(gw, "OPTIONS", "/v1/chat/completions", None, headers=other)
    assert "access-control-allow-origin" not in preflight.headers
    r = send(gw, "GET", "/v1/nothing-here", gw.key)
    assert r.status_code == 404
    assert_error_shape(r)  # LiteLLM's own {"detail": ...}, in OpenAI's shape
    assert_clean(r, gw.key)


# ---- keys ---------------------------------------------------------------------------------------

KEYED = [
    ("POST", "/v1/chat/completions", {"model": LOCAL, "messages": FOX, "max_tokens": 1}),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("GET", "/local/state", None),
]


@pytest.mark.parametrize(("method", "path", "body"), KEYED, ids=[p for _, p, _ in KEYED])
def test_the_key_headers_agree_on_every_route(gateway, method, path, body):
    """One rule everywhere: any key header holding the gateway's key is enough."""
    mixes = [
        ({"Authorization": f"Bearer {WRONG_KEY}", "x-api-key": gateway.key}, True),
        ({"Authorization": f"Bearer {gateway.key}", "x-api-key": WRONG_KEY}, True),
        ({"Authorization": f"Bearer {WRONG_KEY}", "x-litellm-api-key": gateway.key}, True),
        ({"Authorization": f"Bearer {WRONG_KEY}", "x-api-key": WRONG_KEY}, False),
    ]
    for headers, served in mixes:
        r = httpx.request(method, gateway.base_url + path, headers=headers, json=body, timeout=120)
        assert (r.status_code != 401) is served, (headers, r.status_code, r.text[:300])
        assert_clean(r, gateway.key, WRONG_KEY)


def test_a_keyless_401_is_one_log_line(gateway):
    before = len(gateway.log().splitlines())
    r = send(gateway, "POST", "/v1/chat/completions", None, json={"model": LOCAL, "messages": FOX})
    assert r.status_code == 401
    r = send(gateway, "GET", "/health/liveliness", None)  # the 401's lines are written by now
    new = [line for line in gateway.log().splitlines()[before:] if "/health/" not in line]
    refused = [line for line in new if "Refused before routing" in line]
    assert len(refused) == 1, new
    assert not any("Traceback" in line or "Requester IP" in line for line in new), new


def test_health_says_each_models_state_in_one_line(gateway):
    r = send(gateway, "GET", "/health", gateway.key)
    assert r.status_code == 200, r.text
    assert_clean(r, gateway.key)
    models = {m["model"]: m for m in r.json()["models"]}
    assert models[CLOUD]["status"] == "healthy"
    assert models[LOCAL]["status"] == "not checked"  # never loaded for a health check
    assert models["claude-haiku"]["status"] == "unhealthy"  # no key in the tests
    for model in models.values():
        assert set(model) <= {"model", "status", "reason"}
        assert "\n" not in model.get("reason", "") and len(model.get("reason", "")) <= 300


# ---- hostile requests ---------------------------------------------------------------------------

CHAT_FIELDS = {
    "temperature": ["hot", [1], 1e-45, 1e-300, -1, 3, 1e308],
    "top_p": [0, -0.5, 2, "x", 1e-300],
    "max_tokens": [-1, 0, 2**63, "10", 1.5],
    "n": [0, -3, 10**6, "2"],
    "seed": [2**64, -(2**64), "s", 1.5],
    "stop": [5, [1, 2], ["a"] * 40, {"x": 1}],
    "logprobs": ["yes", 3],
    "top_logprobs": [21, -1, "x"],
    "response_format": ["json", {"type": "nope"}, {"type": "json_schema"}],
    "tools": ["x", [{"type": "function"}], [{"type": "function", "function": {"name": 5}}]],
    "tool_choice": [5, {"type": "function"}],
    "keep_alive": ["forever", -5, 1e10, 1e300],
    "stream": ["yes", 1],
    "stream_options": ["x", {"include_usage": "yes"}],
    "user": [5, {"a": 1}],
    "metadata": ["x", {f"k{i}": "v" for i in range(100)}],
    "messages": ["x", [], [5], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}]],
    "model": [5, None, "", "../../etc/passwd", "zlocal/qwen3-4b", "x" * 5000],
    "mock_response": ["hi"],
    "mock_tool_calls": [[{"name": "x"}]],
    "deployment_id": ["x"],
    "specific_deployment": [True],
    "callbacks": [["langfuse"]],
    "guardrails": [["x"]],
    "prompt_id": ["p"],
    "secret_fields": [{"raw_headers": {}}],
    "proxy_server_request": [{"url": "http://x"}],
    "model_alias_map": [{"a": "b"}],
    "tags": [["x"] * 1000],
    "no-log": [True],
    "litellm_logging_obj": ["x"],
    "fallbacks": [["gpt-4o-mini"]],
    "api_base": ["http://127.0.0.1:9"],
    "device": ["cuda:7"],
    "presence_penalty": ["x", 1e300],
    "logit_bias": ["x", {"5": 1e300}],
    "parallel_tool_calls": ["yes"],
    "reasoning_effort": ["extreme", 5],
    "extra_body": ["x", {"device": "cpu"}, {"mock_response": "x"}],
    "timeout": ["x", -1],
    "max_completion_tokens": ["x", -5],
    "top_k": [-1, "x", 2**40],
    "functions": ["x"],
    "function_call": [5],
    "cache": [{"no-cache": True}],
    "max_retries": [50],
    "litellm_metadata": [{"x": 1}],
    "_litellm_internal": [1],
}
OTHER_ROUTES = {
    "/v1/responses": {
        "input": [5, {"a": 1}, [5], None],
        "max_output_tokens": ["x", -1],
        "previous_response_id": [5],
    },
    "/v1/messages": {
        "messages": ["x", [5], []],
        "max_tokens": ["x", None],
        "system": [5],
        "stop_sequences": ["x"],
    },
    "/v1/completions": {
        "prompt": [5, [[64, 65]], [64, 65], [None], {"a": 1}],
        "logprobs": ["x", 99],
        "echo": ["x"],
    },
    "/v1/embeddings": {"input": [5, None]},
    "/v1/audio/speech": {"input": ["hi"]},
    "/v1/rerank": {"query": ["hi"]},
    "/v1/images/generations": {"prompt": ["hi"]},
}
BASES = {
    "/v1/responses": {"input": "a fox", "max_output_tokens": 4},
    "/v1/messages": {"messages": FOX, "max_tokens": 4},
    "/v1/completions": {"prompt": "a fox", "max_tokens": 4},
    "/v1/embeddings": {"input": "a fox"},
    "/v1/audio/speech": {"input": "a fox", "voice": "alloy"},
    "/v1/rerank": {"query": "a fox", "documents": ["a"]},
    "/v1/images/generations": {"prompt": "a fox"},
}


def hostile_requests() -> list[tuple[str, dict]]:
    requests = []
    for model in (LOCAL, CLOUD):
        base = {"model": model, "messages": FOX, "max_tokens": 2}
        for name, values in CHAT_FIELDS.items():
            requests += [("/v1/chat/completions", {**base, name: v}) for v in values]
    for path, fields in OTHER_ROUTES.items():
        for model in (LOCAL, CLOUD):
            base = {"model": model, **BASES[path]}
            requests += [(path, {**base, name: v}) for name, vs in fields.items() for v in vs]
    for route in ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/completions"):
        requests.append((route, {"model": LOCAL, "prompt": "x", "input": "x", "messages": "x"}))
    return requests


# 502/503 are documented answers (a provider that cannot be reached, a full queue, a model that
# cannot load); no other 5xx may answer a request.
DOCUMENTED_5XX = (502, 503)


def test_hostile_requests_get_a_clean_4xx_and_the_gateway_keeps_serving(gateway, client):
    requests = hostile_requests()
    assert len(requests) >= 250, len(requests)
    log_before = len(gateway.log().splitlines())
    for path, body in requests:
        r = send(gateway, "POST", path, gateway.key, json=body)
        assert r.status_code < 500 or r.status_code in DOCUMENTED_5XX, (path, body, r.text[:500])
        assert_clean(r, gateway.key)
        if r.status_code >= 400:
            assert_error_shape(r)
        else:
            assert "mock" not in json.dumps(body) and "deployment_id" not in body, (path, body)
    new_log = "\n".join(gateway.log().splitlines()[log_before:])
    assert "Traceback" not in new_log, new_log[-3000:]
    for model in (LOCAL, CLOUD):
        answer = client.chat.completions.create(model=model, messages=FOX, max_tokens=2)
        assert answer.choices[0].message.content is not None


@pytest.mark.parametrize("route", ["/v1/audio/speech", "/v1/rerank", "/v1/embeddings"])
def test_an_endpoint_a_local_model_does_not_serve_is_a_400_saying_so(gateway, route):
    r = send(gateway, "POST", route, gateway.key, json={"model": LOCAL, **BASES[route]})
    assert r.status_code == 400, r.text
    error = assert_error_shape(r)
    assert error["message"].startswith(f"model '{LOCAL}' does not serve {route}")
    assert error["param"] == "model"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mock_response", "hi"),
        ("deployment_id", "x"),
        ("specific_deployment", True),
        ("callbacks", ["x"]),
        ("guardrails", ["x"]),
        ("tags", ["x"]),
        ("prompt_id", "x"),
        ("secret_fields", {}),
        ("no-log", True),
    ],
)
@pytest.mark.parametrize("model", [LOCAL, CLOUD])
def test_litellms_own_keys_are_a_400_naming_the_key(gateway, fake_openai, name, value, model):
    before = len(fake_openai.requests)
    r = gateway.chat({"model": model, "messages": FOX, "max_tokens": 2, name: value})
    assert r.status_code == 400, r.text
    assert assert_error_shape(r)["param"] == name
    assert len(fake_openai.requests) == before


# ---- no request stalls the others (figures: docs/benchmarks.md, bench/faults.py) --------------


def _post_raw(gateway: Gateway, content: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    return httpx.post(
        f"{gateway.base_url}/v1/chat/completions", content=content, headers=headers, timeout=300
    )


@pytest.mark.parametrize(
    "body",
    [
        {"model": LOCAL, "messages": FOX * 200_000},
        {"model": LOCAL, "messages": FOX, "metadata": {f"k{i}": 1 for i in range(300_000)}},
    ],
    ids=["200,000 messages", "300,000 metadata keys"],
)
def test_a_body_with_too_many_json_values_is_refused_before_it_is_parsed(gateway, body):
    r = _post_raw(gateway, json.dumps(body).encode())
    assert r.status_code == 413, r.text[:300]
    assert "GATEWAY_MAX_JSON_ITEMS" in assert_error_shape(r)["message"]
    assert send(gateway, "GET", "/health/liveliness", None).status_code == 200


def test_an_answer_too_large_to_build_is_refused(gateway):
    body = {"model": LOCAL, "messages": FOX, "n": 8, "max_tokens": 1000, "logprobs": True}
    r = gateway.chat({**body, "top_logprobs": 20})
    assert r.status_code == 400, r.text
    assert "168,000 log probabilities" in assert_error_shape(r)["message"]
    assert gateway.chat({**body, "n": 1, "max_tokens": 2, "top_logprobs": 20}).status_code == 200

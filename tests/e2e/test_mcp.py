"""MCP (``--mcp``): an MCP client (the ``mcp`` package's streamable-HTTP client, the transport
Gradio 6.31 serves at /gradio_api/mcp/) lists optdemo's tools and calls them.

Only state-free tools are offered: plan, status, generate and chat_messages (the whole conversation
in each call); the endpoints with per-session state or that change the model are not tools, yet
stay callable through the named API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from app_fixtures import running_app
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from test_openai_api import SCRIPT, SCRIPTED, LoadedScript

from optdemo.web.mcp import MCP_ENDPOINTS, McpGate

# The named API's endpoints (tests/e2e/test_named_api.py pins their parameters).
NAMED_API = ("plan", "load", "unload", "status", "chat", "generate", "stop", "clear_chat", "sign_in")

pytestmark = pytest.mark.slow


def with_mcp(url: str, work: Callable[[ClientSession], Awaitable[Any]], key: str | None = None) -> Any:
    """Run ``work`` in an initialized MCP session on the app at ``url`` (sending ``key`` as a
    bearer token when given)."""
    headers = {"Authorization": f"Bearer {key}"} if key else None

    async def session() -> Any:
        async with (
            streamablehttp_client(url + "gradio_api/mcp/", headers=headers) as (read, write, _),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            return await work(client)

    return asyncio.run(session())


def text_of(result: Any) -> str:
    assert not result.isError, result
    return "".join(part.text for part in result.content)


@pytest.fixture(scope="module")
def mcp_app():
    with running_app(["--mcp"], manager=LoadedScript(SCRIPT)) as app:
        yield app


def test_tools_are_the_state_free_endpoints_with_descriptions(mcp_app) -> None:
    tools = with_mcp(mcp_app.url, lambda client: client.list_tools()).tools
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == {"plan", "status", "generate", "chat_messages"} == set(MCP_ENDPOINTS)
    assert all(len(tool.description) > 40 for tool in tools if tool.name != "status")
    chat = by_name["chat_messages"].inputSchema
    assert chat["required"] == ["messages"] and chat["properties"]["messages"]["type"] == "array"
    assert "conversation" in chat["properties"]["messages"]["description"]
    assert (
        "Budget per device"
        in by_name["plan"].inputSchema["properties"]["max_memory"]["description"].capitalize()
    )


def test_tools_answer(mcp_app) -> None:
    async def calls(client: ClientSession) -> list:
        messages = [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "hi"},
        ]
        return [
            await client.call_tool("chat_messages", {"messages": messages, "temperature": 0}),
            await client.call_tool("generate", {"prompt": "Once", "max_new_tokens": 3}),
            await client.call_tool("status", {}),
            await client.call_tool("plan", {"model": "tiny-opt", "max_memory": "cpu=1GiB"}),
        ]

    chat, generate, status, plan = with_mcp(mcp_app.url, calls)
    assert text_of(chat) == "Hello world!"
    assert mcp_app.service.manager.histories[-1] == [("earlier", "answer")]  # state-free: all in the call
    assert mcp_app.service.manager.system_prompts[-1] == "Be terse."  # the model's system turn
    assert text_of(generate) == " upon a time"
    assert SCRIPTED in text_of(status)
    assert "'fits': True" in text_of(plan) and "model.decoder.layers.0" in text_of(plan)


def test_refusals_are_tool_errors(mcp_app) -> None:
    async def calls(client: ClientSession) -> list:
        return [
            await client.call_tool("chat_messages", {"messages": [{"role": "assistant", "content": "x"}]}),
            await client.call_tool("sign_in", {"username": "a", "password": "b"}),
            await client.call_tool("load", {"model": "tiny-opt"}),
        ]

    bad_messages, sign_in, load = with_mcp(mcp_app.url, calls)
    assert bad_messages.isError and "the last message must be the user's" in bad_messages.content[0].text
    assert sign_in.isError and load.isError  # not tools: an MCP client has no session of its own


def test_chat_messages_holds_to_the_history_limits(mcp_app) -> None:
    turn = [{"role": "user", "content": "x" * 4000}, {"role": "assistant", "content": "y" * 4000}]
    messages = turn * 30 + [{"role": "user", "content": "hi"}]
    result = with_mcp(mcp_app.url, lambda client: client.call_tool("chat_messages", {"messages": messages}))
    assert result.isError
    assert "hold more than 200000 characters, the limit here: clear it" in result.content[0].text
    assert all(len(history) < 30 for history in mcp_app.service.manager.histories)


def test_api_key_protects_the_mcp_server_too() -> None:
    """With --api-key, the MCP transport (streamable HTTP, SSE, the schema) wants the bearer key,
    as /v1 does; with it, the tools answer."""
    with running_app(["--mcp", "--api-key", "s3cret-key"], manager=LoadedScript(SCRIPT)) as app:
        base = app.url + "gradio_api/mcp"
        for method, path in [("POST", "/"), ("POST", ""), ("GET", "/sse"), ("GET", "/schema")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
                refused = httpx.request(method, base + path, headers=headers, json={}, timeout=10)
                assert refused.status_code == 401, (method, path, headers)
                assert "--api-key" in refused.json()["error"]["message"]
                assert "s3cret-key" not in refused.text
                assert refused.headers["www-authenticate"] == "Bearer"
        messages = [{"role": "user", "content": "hi"}]
        call = with_mcp(app.url, lambda c: c.call_tool("chat_messages", {"messages": messages}), "s3cret-key")
        assert text_of(call) == "Hello world!"
        assert httpx.get(app.url + "gradio_api/info", timeout=10).status_code == 200  # the rest is as before


def test_other_endpoints_stay_callable_through_the_named_api(mcp_app) -> None:
    client = mcp_app.client()
    assert client.predict(api_name="/clear_chat") is True
    documented = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {name.lstrip("/") for name in documented} == {*NAMED_API, *MCP_ENDPOINTS}


def test_keyword_calls_work_with_mcp_on(mcp_app) -> None:
    """Reproduces issue 23 (8): with --mcp, /chat, /load, /unload and /sign_in answered "This
    endpoint does not support key-word arguments", and positional calls needed every argument, so
    the docs' gradio_client examples failed. The tools stay exactly the four."""
    client = mcp_app.client()
    assert client.predict(message="hi", temperature=0.0, api_name="/chat") == "Hello world!"
    assert client.predict("hi", api_name="/chat") == "Hello world!"  # the rest from the defaults
    assert client.predict(username="nobody", password="wrong", api_name="/sign_in") is False
    plan = client.predict(model="tiny-opt", max_memory="cpu=1GiB", api_name="/plan")
    assert plan["fits"] is True and plan["device_map"] == {"": "cpu"}
    assert client.predict(api_name="/unload")["unloaded"] is False  # the scripted model stays
    tools = with_mcp(mcp_app.url, lambda session: session.list_tools()).tools
    assert sorted(tool.name for tool in tools) == sorted(MCP_ENDPOINTS)


def test_without_the_flag_there_is_no_mcp_server() -> None:
    with running_app(manager=LoadedScript(SCRIPT)) as app:
        assert httpx.post(app.url + "gradio_api/mcp/", json={}).status_code == 404
        documented = app.client().view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert "/chat_messages" not in documented and "/load" in documented and "/sign_in" in documented


def test_the_gate_refuses_mcp_requests_past_its_limit_at_once() -> None:
    """McpGate bounds the MCP requests in flight (each may hold one of anyio's threads in Gradio's
    MCP server): past the limit, a 429 that says so; other paths are never counted."""
    release = asyncio.Event()
    entered: list[str] = []

    async def app(scope, receive, send) -> None:
        entered.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> list:
        transport = httpx.ASGITransport(app=McpGate(app, limit=2))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            held = [asyncio.create_task(http.post("/gradio_api/mcp/", json={})) for _ in range(2)]
            other = asyncio.create_task(http.get("/gradio_api/info"))  # not MCP: never counted
            while len(entered) < 3:
                await asyncio.sleep(0.01)
            refused = await http.post("/gradio_api/mcp/", json={})
            release.set()
            answers = [*(await asyncio.gather(*held, other)), await http.post("/gradio_api/mcp", json={})]
            return [refused, *answers]

    refused, *answers = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert (
        refused.json()["error"] == "too many MCP requests are running (at most 2 here): try again in a moment"
    )
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert sorted(entered) == ["/gradio_api/info", "/gradio_api/mcp", "/gradio_api/mcp/", "/gradio_api/mcp/"]

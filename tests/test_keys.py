"""API keys (chatsse/keys.py, chatsse/auth.py, ``chatsse keys``): the keys file, checking a
key, and a real server that requires them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SDK, Serve
from support import FakeClock, chat, wait_for

from chatsse.cli import main
from chatsse.keys import KeyLimits, KeyRing, KeysFileError, create_key, read_keys, revoke_key
from chatsse.serving import access_notice
from chatsse.settings import Settings, SettingsError, load_settings


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the keys file --------------------------------------------------------------------------


def test_a_created_key_is_kept_only_as_its_hash(keys_file: Path) -> None:
    record, key = create_key(keys_file, "alice", limits=KeyLimits(max_streams=3))
    text = keys_file.read_text()
    assert key.startswith(f"csk_{record.id}_")
    assert len(key) == 4 + 8 + 1 + 43
    assert key not in text
    assert key[len("csk_12345678_") :] not in text  # nor its secret alone
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
    assert read_keys(keys_file) == {record.id: record}
    assert record.limits.max_streams == 3
    assert not record.admin


def test_only_the_exact_live_key_authenticates(keys_file: Path) -> None:
    alice, alice_key = create_key(keys_file, "alice")
    _, bob_key = create_key(keys_file, "bob")
    ring = KeyRing(keys_file)
    assert ring.authenticate(alice_key) == alice
    wrong_secret = alice_key[:-1] + ("A" if alice_key[-1] != "A" else "B")
    unknown_id = "csk_00000000_" + alice_key[len("csk_12345678_") :]  # a real secret, an id that is not
    swapped = f"csk_{alice.id}_{bob_key[13:]}"  # alice's id, bob's secret
    for presented in (wrong_secret, unknown_id, swapped, alice_key + "x", "", "Bearer", alice.hash):
        assert ring.authenticate(presented) is None, presented


def test_a_revoked_key_stops_working_once_the_file_is_read_again(keys_file: Path) -> None:
    record, key = create_key(keys_file, "alice")
    clock = FakeClock()
    ring = KeyRing(keys_file, clock=clock)
    assert ring.authenticate(key) == record
    revoked = revoke_key(keys_file, record.id)
    assert revoked.revoked_at is not None
    assert ring.authenticate(key) == record  # looked at once a second at most
    clock.advance(1.0)
    assert ring.authenticate(key) is None
    assert read_keys(keys_file)[record.id].revoked_at == revoked.revoked_at  # kept, to say when


def test_a_broken_keys_file_keeps_the_keys_already_read(keys_file: Path) -> None:
    record, key = create_key(keys_file, "alice")
    clock = FakeClock()
    ring = KeyRing(keys_file, clock=clock)
    keys_file.write_text("{not json")
    clock.advance(1.0)
    assert ring.authenticate(key) == record


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "no keys file"),
        ("[]", "not a chatsse keys file"),
        ('{"version": 1, "keys": [{"id": "x"}]}', "invalid"),
        (
            '{"version": 1, "keys": [{"id": "BAD", "name": "n", "hash": "sha256:0", "created_at": 0}]}',
            "invalid id",
        ),
    ],
)
def test_a_bad_keys_file_stops_start_up_naming_the_setting(
    keys_file: Path, text: str | None, problem: str
) -> None:
    if text is not None:
        keys_file.write_text(text)
    with pytest.raises(KeysFileError, match=problem):
        read_keys(keys_file)
    with pytest.raises(SettingsError) as error:
        load_settings(keys_file=str(keys_file))
    assert "CHATSSE_KEYS_FILE" in str(error.value)
    assert problem in str(error.value)


def test_limits_must_be_whole_numbers() -> None:
    with pytest.raises(ValueError, match="max_streams"):
        KeyLimits(max_streams=-1)
    with pytest.raises(ValueError, match="tokens_per_minute"):
        KeyLimits(tokens_per_minute=1.5)  # type: ignore[arg-type]


# --- binding without keys -------------------------------------------------------------------


def test_a_reachable_address_without_keys_needs_allow_open(keys_file: Path) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(host="0.0.0.0")
    for name in ("CHATSSE_HOST", "CHATSSE_KEYS_FILE", "CHATSSE_ALLOW_OPEN"):
        assert name in str(error.value)
    assert load_settings(host="0.0.0.0", allow_open=True).host == "0.0.0.0"
    create_key(keys_file, "alice")
    assert load_settings(host="::", keys_file=str(keys_file)).host == "::"
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert load_settings(host=loopback).host == loopback


def test_start_up_says_whether_the_server_is_open(keys_file: Path) -> None:
    open_notice = access_notice(Settings(_env_file=None))  # type: ignore[call-arg]
    assert "no API keys" in open_notice
    assert "from this machine only" in open_notice
    wide = access_notice(Settings(_env_file=None, host="0.0.0.0", allow_open=True))  # type: ignore[call-arg]
    assert "open to anyone" in wide
    assert "from anywhere" in wide
    create_key(keys_file, "alice")
    keyed = access_notice(Settings(_env_file=None, keys_file=str(keys_file)))  # type: ignore[call-arg]
    assert "API keys required" in keyed
    assert str(keys_file) in keyed


# --- the command ----------------------------------------------------------------------------


def test_keys_command_creates_lists_and_revokes(keys_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["keys", "create", "--name", "ci", "--admin", "--max-streams", "2", "--file", str(keys_file)])
        == 0
    )
    key = capsys.readouterr().out.strip()
    (record,) = read_keys(keys_file).values()
    assert KeyRing(keys_file).authenticate(key) == record
    assert record.admin
    assert record.limits.max_streams == 2
    assert main(["keys", "list", "--file", str(keys_file)]) == 0
    listed = capsys.readouterr().out
    assert record.id in listed
    assert "admin" in listed
    assert "max_streams=2" in listed
    assert key not in listed
    assert main(["keys", "revoke", record.id, "--file", str(keys_file)]) == 0
    assert KeyRing(keys_file).authenticate(key) is None
    assert main(["keys", "revoke", "nosuchid", "--file", str(keys_file)]) == 1
    assert main(["keys", "list", "--file", str(keys_file / "missing")]) == 2


# --- a server with keys ---------------------------------------------------------------------


@pytest.fixture
def keyed(serve: Serve, keys_file: Path) -> tuple[str, str, str, str]:
    """A server with keys: its URL, a user's key, an admin's key, and a revoked key."""
    _, user = create_key(keys_file, "alice")
    _, admin = create_key(keys_file, "ops", admin=True)
    gone, revoked = create_key(keys_file, "gone")
    revoke_key(keys_file, gone.id)
    server = serve(keys_file=str(keys_file))
    return server.url, user, admin, revoked


API_ROUTES = [
    ("GET", "/conversations"),
    ("POST", "/conversations"),
    ("GET", "/conversations/abc"),
    ("DELETE", "/conversations/abc"),
    ("POST", "/chat"),
    ("GET", "/conversations/abc/messages/msg_x/events"),
    ("POST", "/conversations/abc/messages/msg_x/stop"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_a.msg_b"),
    ("DELETE", "/v1/responses/resp_a.msg_b"),
    ("POST", "/v1/responses/resp_a.msg_b/cancel"),
    ("GET", "/metrics"),
    ("GET", "/stats"),
]


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
def test_every_api_route_needs_a_key_and_no_answer_says_which_keys_exist(
    keyed: tuple[str, str, str, str], method: str, path: str
) -> None:
    url, user, _, revoked = keyed
    unknown = "csk_00000000_" + user[len("csk_12345678_") :]
    with httpx.Client(base_url=url, timeout=10) as client:
        missing = client.request(method, path, json={})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="chatsse"'
        answers = [
            client.request(method, path, json={}, headers=bearer(key))
            for key in (user[:-2] + "zz", unknown, revoked, "not-a-key")
        ]
        answers.append(client.request(method, path, json={}, headers={"Authorization": f"Basic {user}"}))
    shape = missing.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's error shape, which its SDK reads
        assert shape["type"] == "authentication_error"
        assert shape["code"] == "invalid_api_key"
    else:
        assert shape["type"] == "invalid_api_key"
    for answer in answers:  # wrong, unknown, revoked, malformed: one and the same answer
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == 'Bearer realm="chatsse", error="invalid_token"'
        assert answer.content == answers[0].content
    assert user not in answers[0].text


@pytest.mark.parametrize("path", ["/", "/health", "/openapi.json", "/docs"])
def test_public_routes_need_no_key(keyed: tuple[str, str, str, str], path: str) -> None:
    assert httpx.get(keyed[0] + path, timeout=10).status_code == 200


def test_a_key_opens_the_api_and_only_an_admin_key_the_operator_routes(
    keyed: tuple[str, str, str, str],
) -> None:
    url, user, admin, _ = keyed
    with httpx.Client(base_url=url, timeout=10, headers=bearer(user)) as client:
        result = chat(client, "hello")
        assert result.status == 200
        assert result.named("completed")
        assert client.get("/conversations").json()["total"] == 1
        for path in ("/metrics", "/stats"):
            refused = client.get(path)
            assert refused.status_code == 403
            assert refused.json()["error"]["type"] == "permission_denied"
            assert httpx.get(url + path, headers=bearer(admin), timeout=10).status_code == 200


def test_operator_routes_can_be_left_open_to_every_key(serve: Serve, keys_file: Path) -> None:
    _, user = create_key(keys_file, "alice")
    server = serve(keys_file=str(keys_file), operator_routes_open=True)
    assert httpx.get(server.url + "/stats", headers=bearer(user), timeout=10).status_code == 200
    assert httpx.get(server.url + "/stats", timeout=10).status_code == 401


def test_the_openai_sdk_sends_its_api_key_as_a_bearer_key(keyed: tuple[str, str, str, str], sdk: SDK) -> None:
    url, user, _, _ = keyed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=user, max_retries=0, timeout=30)
    try:
        reply = client.chat.completions.create(
            model="simulated", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        stream = client.responses.create(model="simulated", input="hi", stream=True)
        assert [e.type for e in stream][-1] == "response.completed"
    finally:
        client.close()
    with pytest.raises(openai.AuthenticationError) as error:
        sdk(url).models.list()  # the fixture's client sends a key the server does not know
    assert error.value.code == "invalid_api_key"


def test_a_key_revoked_while_the_server_runs_is_refused_within_seconds(
    keyed: tuple[str, str, str, str], keys_file: Path
) -> None:
    url, user, _, _ = keyed
    assert httpx.get(url + "/conversations", headers=bearer(user), timeout=10).status_code == 200
    (alice,) = [k for k in read_keys(keys_file).values() if k.name == "alice"]
    revoke_key(keys_file, alice.id)
    assert wait_for(
        lambda: httpx.get(url + "/conversations", headers=bearer(user), timeout=10).status_code == 401,
        timeout=5,
    )


def test_keys_file_is_json_a_person_can_read(keys_file: Path) -> None:
    record, _ = create_key(keys_file, "alice", limits=KeyLimits(requests_per_minute=60))
    data = json.loads(keys_file.read_text())
    assert data["version"] == 1
    assert data["keys"][0]["limits"] == {
        "max_streams": None,
        "requests_per_minute": 60,
        "tokens_per_minute": None,
    }
    assert data["keys"][0]["hash"] == record.hash


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/no/such/route", 404), ("PUT", "/chat", 405), ("GET", "/chat", 405)],
)
def test_a_request_no_route_serves_gets_its_404_or_405_without_a_key(
    keyed: tuple[str, str, str, str], method: str, path: str, status: int
) -> None:
    answer = httpx.request(method, keyed[0] + path, timeout=10)
    assert answer.status_code == status
    if status == 405:
        assert answer.headers["allow"] == "POST"

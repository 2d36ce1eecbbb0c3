"""Where `courier` takes --url and --token: before the command or after it.

`courier --url X dlq list` was refused ("No such option '--url'"): only the commands took them.
The CLI runs in process against a canned ops API, which records the token it was sent.
"""

from __future__ import annotations

from click.testing import CliRunner, Result

from services.ops.cli import cli
from tests.support.ops_api import Answer, FakeOpsApi
from tests.support.processes import free_port

EMPTY = {"/dead-letters": Answer({"items": [], "next_cursor": None})}


def courier(*args: str, **env: str | None) -> Result:
    env = {"COURIER_URL": None, "COURIER_OPS_TOKEN": None, **env}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_url_and_token_may_come_before_the_command() -> None:
    with FakeOpsApi(EMPTY).running() as api:
        result = courier("--url", api.url, "--token", "before", "dlq", "list")
        assert result.exit_code == 0, result.output
        assert [r.authorization for r in api.requests] == ["Bearer before"]


def test_url_and_token_after_the_command_win_over_those_before_it() -> None:
    with FakeOpsApi(EMPTY).running() as api:
        args = ["--url", nowhere(), "--token", "before", "dlq", "list"]
        result = courier(*args, "--url", api.url, "--token", "after")
        assert result.exit_code == 0, result.output
        assert [r.authorization for r in api.requests] == ["Bearer after"]


def test_url_and_token_before_the_command_win_over_the_environment() -> None:
    with FakeOpsApi(EMPTY).running() as api:
        env = {"COURIER_URL": nowhere(), "COURIER_OPS_TOKEN": "from-env"}
        result = courier("--url", api.url, "--token", "before", "dlq", "list", **env)
        assert result.exit_code == 0, result.output
        assert [r.authorization for r in api.requests] == ["Bearer before"]


def test_a_password_in_the_url_is_not_printed() -> None:
    """A gateway behind a proxy that wants basic auth is reached as `https://user:pw@host`:
    the errors quoted the URL with its password, on the terminal and in `--json`."""
    secret_url = nowhere().replace("http://", "http://ops:pr0xy-s3cret@")
    for json_flag in ((), ("--json",)):
        result = courier("--url", secret_url, "--token", "t", "dlq", "list", *json_flag)
        assert result.exit_code == 4
        assert "pr0xy-s3cret" not in result.output + result.stderr
        assert "cannot reach the gateway at http://ops:" in result.output + result.stderr


def test_a_url_that_is_not_one_is_a_usage_error_not_a_traceback() -> None:
    for url in ("::", "http://host:port", "ftp://gateway", "gateway:8000"):
        result = CliRunner().invoke(cli, ["--url", url, "--token", "t", "dlq", "list"])
        assert result.exit_code == 2, (url, result.output, result.exception)
        assert "Invalid value for '--url'" in result.output, result.output

"""The token file and the scopes: parsing, constant-time matching, rereading, and who may touch what."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orchestrator.access import ANYONE, Principal, TokenFile, fingerprint, parse_tokens, read_token_file
from orchestrator.config import ServeConfig
from orchestrator.errors import InvalidArgument, PermissionDenied

ADMIN = "admin-token-0123456789abcdef"
DEV = "dev-token-0123456789abcdefgh"


def test_tokens_with_and_without_environments_comments_and_blank_lines() -> None:
    """A bare token may touch every environment; a listed one only those; comments and blanks are skipped."""
    tokens = parse_tokens(f"# the file\n\n{ADMIN}   # platform\n  {DEV} dev,staging  \n", "f")
    assert len(tokens) == 2
    admin, dev = tokens.authenticate(ADMIN), tokens.authenticate(DEV)
    assert admin == Principal(fingerprint(ADMIN), None)
    assert dev == Principal(fingerprint(DEV), frozenset({"dev", "staging"}))
    assert admin.allows("prod") and dev.allows("staging") and not dev.allows("prod")


@pytest.mark.parametrize(
    "presented",
    ["", ADMIN[:-1], ADMIN + "x", ADMIN.upper(), f" {ADMIN}", "nobody-token-0123456789abcd"],
)
def test_anything_but_a_whole_known_token_is_unknown(presented: str) -> None:
    """A prefix, an extension, another case or another token matches nothing."""
    assert parse_tokens(f"{ADMIN}\n{DEV} dev\n", "f").authenticate(presented) is None


def test_a_principal_is_named_by_a_fingerprint_not_the_token() -> None:
    """The name is ``token:`` and 8 hex digits of the SHA-256: stable, and not the token."""
    name = fingerprint(ADMIN)
    assert name.startswith("token:") and len(name) == len("token:") + 8
    assert ADMIN not in name and fingerprint(ADMIN) == name != fingerprint(DEV)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"# x\n{ADMIN}\nshort-token\n", "f, line 3: the token is 11 characters long; use at least 16"),
        (f"{ADMIN} Prod\n", "f, line 1: environment 'Prod' is invalid"),
        (f"{ADMIN} dev, prod\n", "f, line 1: expected TOKEN [ENV,ENV,...]"),
        (f"{ADMIN} dev,,prod\n", "f, line 1: environment '' is invalid"),
        (f"{ADMIN}\n\n{ADMIN} dev\n", "f, line 3: the same token is on line 1"),
        ("tok\u00e9n-with-an-accent-0123\n", "f, line 1: the token has characters a bearer token cannot have"),
        ("# only comments\n\n", "f holds no token"),
        ("", "f holds no token"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_line_never_the_token(text: str, expected: str) -> None:
    """Each problem names the line; the message never holds the token."""
    with pytest.raises(InvalidArgument) as caught:
        parse_tokens(text, "f")
    assert str(caught.value).startswith(expected), str(caught.value)
    for token in (ADMIN, "short-token", "tok\u00e9n-with-an-accent-0123"):
        assert token not in str(caught.value)


def test_a_file_others_may_read_is_served_with_a_warning(tmp_path: Path) -> None:
    """Modes 0600, 0400, 0640 and 0440 are quiet; 0644, 0604 and 0660 are read, with a warning naming the fix."""
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN}\n")
    for mode in (0o600, 0o400, 0o640, 0o440):
        path.chmod(mode)
        assert read_token_file(path)[1] == ""
    for mode in (0o644, 0o604, 0o660):
        path.chmod(mode)
        tokens, warning = read_token_file(path)
        assert len(tokens) == 1
        assert f"mode {mode:04o}" in warning and f"chmod 600 {path}" in warning
    path.chmod(0o600)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    """A missing file is one clear error."""
    with pytest.raises(InvalidArgument, match=r"cannot read the token file .*nope"):
        read_token_file(tmp_path / "nope")


def test_reload_swaps_the_tokens_and_a_bad_file_keeps_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A good new file replaces the tokens; a bad one (or none) keeps those in force and logs an ERROR."""
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN}\n")
    path.chmod(0o600)
    file = TokenFile(path)
    path.write_text(f"{DEV} dev\n")
    assert file.reload() is True
    assert file.tokens.authenticate(ADMIN) is None and file.tokens.authenticate(DEV) is not None

    caplog.set_level(logging.INFO, logger="orchestrator.access")
    for bad in (f"{ADMIN} Not-An-Env\n", "# emptied by mistake\n"):
        path.write_text(bad)
        assert file.reload() is False
        assert file.tokens.authenticate(DEV) is not None
    path.unlink()
    assert file.reload() is False
    assert file.tokens.authenticate(DEV) is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("the 1 token(s) read before stay in force" in r.getMessage() for r in errors)
    assert ADMIN not in caplog.text and DEV not in caplog.text


def test_require_refuses_an_environment_outside_the_scope() -> None:
    """PERMISSION_DENIED names the environment; anyone (no token file) may touch all."""
    dev = Principal("token:00000000", frozenset({"dev"}))
    dev.require("dev")
    with pytest.raises(PermissionDenied, match="may not touch environment 'prod'"):
        dev.require("prod")
    ANYONE.require("prod")


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:0", "orchestrator.internal:50051"])
def test_a_non_loopback_listen_address_needs_tls_tokens_or_insecure(listen: str) -> None:
    """Neither TLS nor tokens nor --insecure: refused. Any one of them: accepted."""
    with pytest.raises(InvalidArgument, match="without TLS or a token"):
        ServeConfig(listen=listen)
    ServeConfig(listen=listen, insecure=True)
    ServeConfig(listen=listen, tls_cert=Path("c"), tls_key=Path("k"))
    ServeConfig(listen=listen, auth_token_file=Path("t"))


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:50051", "[::1]:50051", "127.8.9.10:1"])
def test_a_loopback_listen_address_needs_nothing(listen: str) -> None:
    """Loopback is allowed as before."""
    assert ServeConfig(listen=listen).listen == listen


def test_tls_settings_that_cannot_work_are_refused() -> None:
    """A certificate without its key (or the reverse), or a client CA without TLS."""
    with pytest.raises(InvalidArgument, match="--tls-cert needs --tls-key"):
        ServeConfig(tls_cert=Path("c"))
    with pytest.raises(InvalidArgument, match="--tls-key needs --tls-cert"):
        ServeConfig(tls_key=Path("k"))
    with pytest.raises(InvalidArgument, match="--tls-client-ca needs --tls-cert"):
        ServeConfig(tls_client_ca=Path("ca"))

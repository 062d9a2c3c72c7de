"""Redaction: a credential echoed in any encoding a provider may use is replaced, and nothing else is.

For random secrets (quotes, backslashes, ``%``, ``+``, spaces, control
characters, any Unicode), each encoding of the secret embedded in text is
redacted whole, and no piece of the text left between the ``[redacted]``
markers holds the secret or any of its encodings, or decodes to the secret.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from orchestrator.provider import MIN_SECRET_LENGTH, REDACTED, redact, redact_excerpt


def _json(secret: str) -> str:
    return json.dumps(secret)[1:-1]


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def _upper_unicode_escapes(text: str) -> str:
    return re.sub(r"\\u[0-9a-f]{4}", lambda m: "\\u" + m.group()[2:].upper(), text)


def _b64(secret: str) -> str:
    return base64.b64encode(secret.encode()).decode()


ENCODINGS: dict[str, Callable[[str], str]] = {
    "as-is": lambda s: s,
    "url-quote": lambda s: quote(s, safe=""),
    "url-quote-path": quote,  # "/" left as is
    "url-quote-plus": quote_plus,
    "url-lowercase-hex": lambda s: _lower_hex(quote(s, safe="")),
    "json-ascii": _json,
    "json-utf8": lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    "json-escaped-slash": lambda s: _json(s).replace("/", "\\/"),
    "json-uppercase-hex": lambda s: _upper_unicode_escapes(_json(s)),
    "json-in-url": lambda s: quote(_json(s), safe=""),
    "json-in-url-plus": lambda s: quote_plus(_json(s)),
    "url-in-json": lambda s: _json(quote(s)).replace("/", "\\/"),
    "html": html.escape,
    "base64": _b64,
    "base64-unpadded": lambda s: _b64(s).rstrip("="),
    "base64-urlsafe": lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
    "base64-in-url": lambda s: quote(_b64(s), safe=""),
}
"""Every encoding covered, each of the whole secret."""
TEXT_ENCODINGS = {name: encode for name, encode in ENCODINGS.items() if not name.startswith("base64")}
DECODERS: list[Callable[[str], str]] = [unquote, unquote_plus, html.unescape]

NASTY = "\"\\%+ /&;#<>'\n\t\x01\x7fu"
SECRETS = st.text(
    st.one_of(st.sampled_from(NASTY), st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
    min_size=MIN_SECRET_LENGTH,
    max_size=40,
)
"""Secrets long enough to be redacted, with every character that needs escaping somewhere; no NUL (the tests' fence)."""
FENCE = ("<\x00", "\x00>")
"""Text around an encoded secret that no encoding of it contains, so that it must survive redaction as it is."""


def pieces(redacted: str) -> list[str]:
    """The text left between the markers."""
    return redacted.split(REDACTED)


def assert_unrecoverable(redacted: str, secret: str) -> None:
    """No piece of ``redacted`` holds ``secret`` in a covered encoding, or decodes to it."""
    for piece in pieces(redacted):
        for name, encode in TEXT_ENCODINGS.items():
            assert encode(secret) not in piece, (name, piece)
        for decode in DECODERS:
            assert secret not in decode(piece), (decode.__name__, piece)


@pytest.mark.parametrize("encoding", ENCODINGS.values(), ids=ENCODINGS.keys())
@given(secret=SECRETS)
@example(secret='to"ken\\1')
@example(secret="p@ss w/rd+%41é😀")
def test_each_encoding_of_a_secret_is_redacted_whole(encoding: Callable[[str], str], secret: str) -> None:
    """The encoded secret is replaced by one marker; the text around it is kept as it is."""
    before, after = FENCE
    redacted = redact(before + encoding(secret) + after, {"access_token": secret})
    assert redacted == before + REDACTED + after


@pytest.mark.parametrize("encoding", ENCODINGS.values(), ids=ENCODINGS.keys())
@given(secret=SECRETS, before=st.text(max_size=30), after=st.text(max_size=30))
def test_no_piece_left_around_an_encoded_secret_gives_it_back(
    encoding: Callable[[str], str], secret: str, before: str, after: str
) -> None:
    """Whatever text surrounds it, nothing left between the markers holds or decodes to the secret."""
    redacted = redact(before + encoding(secret) + after, {"api_key": secret})
    assert REDACTED in redacted
    assert_unrecoverable(redacted, secret)


def base64_fragments(piece: str) -> list[bytes]:
    """What a piece of base64 text decodes to, at each of the four alignments it could have."""
    fragments = []
    for start in range(4):
        chunk = piece[start:]
        chunk = chunk[: len(chunk) // 4 * 4]
        for alphabet in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                fragments.append(alphabet(chunk))
            except ValueError:
                pass
    return fragments


@given(secret=SECRETS, before=st.binary(max_size=10), after=st.binary(max_size=10), urlsafe=st.booleans())
def test_a_secret_inside_a_base64_blob_is_redacted(secret: str, before: bytes, after: bytes, urlsafe: bool) -> None:
    """Base64 of bytes that hold the secret anywhere (a basic-auth pair, a JSON document) decodes to no copy of it."""
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    blob = encode(before + secret.encode() + after).decode()

    redacted = redact(f"Basic {blob}", {"password": secret})

    assert REDACTED in redacted
    for piece in pieces(redacted):
        assert not any(secret.encode() in fragment for fragment in base64_fragments(piece)), piece


@given(username=st.text(max_size=20), password=SECRETS)
def test_the_basic_auth_header_is_redacted_whole(username: str, password: str) -> None:
    """The Authorization header's base64 pair is replaced as a whole."""
    pair = base64.b64encode(f"{username}:{password}".encode()).decode()
    credentials = {"username": username, "password": password}

    assert redact(f"you sent Basic {pair}.", credentials) == f"you sent Basic {REDACTED}."


@given(
    secret=SECRETS,
    encoding=st.sampled_from(list(ENCODINGS.values())),
    fill=st.integers(0, 400),
    copies=st.integers(1, 40),
    limit=st.integers(1, 300),
)
def test_an_excerpt_is_cut_after_redacting(
    secret: str, encoding: Callable[[str], str], fill: int, copies: int, limit: int
) -> None:
    """The excerpt is the redacted text's beginning: a secret across the cut is not halved (copies make it shrink)."""
    text = "x" * fill + (encoding(secret) + " ") * copies + "y" * 100

    assert redact_excerpt(text, {"access_token": secret}, limit) == redact(text, {"access_token": secret})[:limit]


def test_short_values_are_not_redacted() -> None:
    """A value shorter than the minimum would blank ordinary words: it is left alone, in every form."""
    text = "on 1 of 3 tries: token on, key 42"
    assert redact(text, {"access_token": "on", "api_key": "42", "password": "abc"}) == text
    assert MIN_SECRET_LENGTH == 4


def test_text_without_a_secret_is_unchanged() -> None:
    """Escapes, entities and base64 in the text that are not a secret's are kept as they are."""
    text = 'GET /a%20b?q=1+2 {"e": "\\"x\\" \\u00e9"} &amp; &#34; YWJj\n'
    assert redact(text, {"access_token": "s3cr3t-value"}) == text

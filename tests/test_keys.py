"""keys.py: key form, hashing, credential parsing, and no key ever on disk in clear."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routstr import errors, keys
from routstr.db import Database
from routstr.keys import (
    ApiKeyCredential,
    CashuCredential,
    generate_api_key,
    hash_key,
    parse_bearer,
    parse_x_cashu,
    short_hash,
    token_api_key,
)
from routstr.ledger import Ledger

TOKEN = "cashuBo2FteCJodHRwczovL21pbnQuZXhhbXBsZS5jb21hdWNzYXRhdIGiYWlIAJofKTJT5B5hcIA"


def test_generated_keys_have_the_spec_form() -> None:
    seen = {generate_api_key() for _ in range(500)}
    assert len(seen) == 500
    for k in seen:
        assert re.fullmatch(r"sk-[0-9a-z]{32}", k), k
    # every character of the alphabet shows up: the randomness covers it
    assert set("".join(k[3:] for k in seen)) == set(keys.API_KEY_ALPHABET)


def test_hashes_and_token_keys() -> None:
    k = "sk-abc"
    assert hash_key(k) == hashlib.sha256(b"sk-abc").hexdigest()
    assert short_hash(k) == hash_key(k)[:8]
    assert token_api_key(TOKEN) == "sk-" + hashlib.sha256(TOKEN.encode()).hexdigest()
    assert keys.key_hint(k) == "-abc"[-4:]
    assert keys.masked("sk-0123456789") == "sk-…6789"
    assert keys.secrets_equal("a" * 32, "a" * 32) and not keys.secrets_equal("a", "b")
    ref = keys.token_deposit_ref(TOKEN)
    assert len(ref) == 64 and ref not in token_api_key(TOKEN)


def test_token_and_its_sk_key_find_the_same_account() -> None:
    by_token = parse_bearer(f"Bearer {TOKEN}")
    assert isinstance(by_token, CashuCredential)
    by_key = parse_bearer(f"Bearer {by_token.api_key}")
    assert isinstance(by_key, ApiKeyCredential)
    assert by_token.key_hash == by_key.key_hash


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Bearer sk-abc123", ApiKeyCredential("sk-abc123")),
        ("bearer   sk-abc123  ", ApiKeyCredential("sk-abc123")),
        ("BEARER\tsk-abc123", ApiKeyCredential("sk-abc123")),
        (f"Bearer {TOKEN[:30]}\n  {TOKEN[30:]}", CashuCredential(TOKEN)),
        (f"Bearer {TOKEN}", CashuCredential(TOKEN)),
    ],
)
def test_parse_bearer(header: str | None, expected: object) -> None:
    assert parse_bearer(header) == expected


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("", "missing_api_key"),
        ("   ", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Bearer    ", "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_api_key"),
        ("sk-abc", "invalid_api_key"),
        ("Bearer abc", "invalid_api_key"),
        ("Bearer sk-", "invalid_api_key"),
        ("Bearer sk-ab cd", "invalid_api_key"),
        ("Bearer sk-" + "a" * 300, "invalid_api_key"),
    ],
)
def test_parse_bearer_rejects(header: str, code: str) -> None:
    with pytest.raises(errors.AuthenticationFailed) as e:
        parse_bearer(header)
    assert e.value.code == code and e.value.status == 401


def test_parse_x_cashu() -> None:
    assert parse_x_cashu(None) is None
    assert parse_x_cashu("  ") is None
    assert parse_x_cashu(f" {TOKEN} ") == CashuCredential(TOKEN)
    assert parse_x_cashu("sk-abc") == ApiKeyCredential("sk-abc")
    with pytest.raises(errors.AuthenticationFailed) as e:
        parse_x_cashu("garbage")
    assert e.value.code == "invalid_cashu_token"


@given(st.text(max_size=80))
def test_parse_bearer_never_crashes_otherwise(value: str) -> None:
    try:
        parse_bearer(value)
    except errors.AuthenticationFailed:
        pass


def test_credentials_do_not_leak_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    key = generate_api_key()
    for cred in (ApiKeyCredential(key), CashuCredential(TOKEN)):
        with caplog.at_level(logging.INFO):
            logging.getLogger("test").info("auth with %r %s", cred, cred)
        assert key not in caplog.text and TOKEN not in caplog.text
        assert key not in repr(cred) and TOKEN not in repr(cred)


def test_database_never_holds_a_key_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    api_key = generate_api_key()
    token_key = token_api_key(TOKEN)
    d = Database(path)
    lg = Ledger(d)
    parent = lg.create_account(
        key_hash=hash_key(api_key), kind="api", deposit_msats=10_000, hint=keys.key_hint(api_key)
    )
    lg.create_account(
        key_hash=hash_key(token_key),
        kind="token",
        deposit_msats=5_000,
        hint=keys.key_hint(token_key),
        ref=keys.token_deposit_ref(TOKEN),
    )
    child_key = generate_api_key()
    lg.create_child(parent.id, hash_key(child_key), hint=keys.key_hint(child_key))
    r = lg.reserve(parent.id, 100, request_id="req", ttl_s=60)
    lg.settle(r.id, 10)
    assert lg.get_account(hash_key(api_key)).id == parent.id
    d.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys"))
    for secret in (api_key, token_key, child_key, TOKEN):
        assert secret.encode() not in blob
        assert secret[3:].encode() not in blob  # nor the key without its prefix
        assert secret[:-4].encode() not in blob  # the hint is the last 4 characters only
    # the token key's suffix is the token's hash: only its hash is stored, as for any key
    assert hash_key(api_key).encode() in blob

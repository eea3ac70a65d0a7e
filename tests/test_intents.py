"""Money intents (routstr/intents.py): the typed form of what a wallet operation does to a
balance. The stored JSON is the form operations were always written ahead in, so an operation
pending across an upgrade applies the same; anything else is refused before a mint call."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from routstr import intents
from routstr.intents import CreateAccount, Credit, Debit

ROOT = Path(__file__).resolve().parents[1]

# Every shape the node wrote into wallet_ops.purpose before the intents were typed (the literal
# dicts cashupay built), and what each means.
STORED: list[tuple[dict[str, Any], intents.Intent]] = [
    ({"action": "create_account", "key_hash": "h1", "kind": "token", "ref": "r1", "hint": "abcd",
      "refund_mint": "http://m", "refund_unit": "sat"},
     CreateAccount("h1", "token", ref="r1", hint="abcd", refund_mint="http://m",
                   refund_unit="sat")),
    ({"action": "create_account", "key_hash": "h2", "kind": "api", "ref": "r2", "hint": "wxyz",
      "refund_mint": "http://m", "refund_unit": "sat", "balance_limit_msats": 5000,
      "balance_limit_reset": "daily", "validity_date": 1900000000,
      "fallback": {"action": "create_account", "key_hash": "h1", "kind": "token",
                   "ref": "rescue:r2", "hint": "abcd", "refund_mint": "http://m",
                   "refund_unit": "sat"}},
     CreateAccount("h2", "api", ref="r2", hint="wxyz", refund_mint="http://m",
                   refund_unit="sat", balance_limit_msats=5000, balance_limit_reset="daily",
                   validity_date=1900000000,
                   fallback=CreateAccount("h1", "token", ref="rescue:r2", hint="abcd",
                                          refund_mint="http://m", refund_unit="sat"))),
    ({"action": "credit", "account_id": 7, "kind": "deposit", "ref": "r3",
      "fallback": {"action": "create_account", "kind": "api", "key_hash": "h3",
                   "ref": "invoice-rescue:9", "hint": "q", "refund_mint": "http://m",
                   "refund_unit": "sat"}},
     Credit(7, "deposit", ref="r3", fallback=CreateAccount(
         "h3", "api", ref="invoice-rescue:9", hint="q", refund_mint="http://m",
         refund_unit="sat"))),
    ({"action": "debit", "account_id": 7, "amount_msats": 3000, "kind": "change", "ref": "c",
      "rounding_msats": 995}, Debit(7, 3000, "change", ref="c", rounding_msats=995)),
    ({"action": "debit", "account_id": 7, "amount_msats": 1000, "kind": "refund", "ref": "f"},
     Debit(7, 1000, "refund", ref="f")),
]


@pytest.mark.parametrize(("stored", "intent"), STORED)
def test_what_was_stored_before_means_the_same(stored: dict[str, Any],
                                               intent: intents.Intent) -> None:
    assert intents.from_json(stored) == intent
    assert intents.from_json(intents.to_json(intent)) == intent  # and round-trips


def test_no_intent_is_the_nodes_own_money() -> None:
    assert intents.from_json(None) is None and intents.from_json({"action": "none"}) is None
    assert intents.to_json(None) is None


@pytest.mark.parametrize("bad", [
    {"action": "mint_money", "account_id": 1},
    {"action": "credit", "account_id": 1, "amount": 5},  # unknown field
    {"action": "credit", "account_id": "1"},
    {"action": "credit", "account_id": True},  # a bool is not an account
    {"action": "credit", "account_id": 1, "amount_msats": -1},
    {"action": "credit", "account_id": 1, "kind": "gift"},
    {"action": "debit", "account_id": 1},  # no amount
    {"action": "debit", "account_id": 1, "amount_msats": 10, "kind": "deposit"},
    {"action": "credit", "account_id": 1, "fallback": {"action": "debit", "account_id": 1,
                                                        "amount_msats": 1}},
    {"action": "create_account", "key_hash": 5},
    {"action": "none", "account_id": 1},
    {"action": ["credit"]},
    ["credit"],
])
def test_malformed_intents_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        intents.from_json(bad)


def test_money_decisions_are_built_only_as_intents() -> None:
    """No module but intents.py writes a purpose dict (`{"action": ...}`) by hand: every
    credit, account and debit a wallet operation carries is a typed intent."""
    offenders = []
    for path in sorted((ROOT / "routstr").rglob("*.py")):
        if path.name == "intents.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(
                    isinstance(k, ast.Constant) and k.value == "action" for k in node.keys):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []

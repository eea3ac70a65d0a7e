"""Integer millisatoshi helpers. Money is never a float anywhere in the node.

1 sat = 1000 msat. Rounding is explicit: costs round up (`ceil_div`), amounts paid out round
down to whole sats (`msat_to_sat_floor`), so the node never hands out what it does not hold.
"""

from __future__ import annotations

MSAT_PER_SAT = 1000


def ceil_div(numerator: int, denominator: int) -> int:
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -(-numerator // denominator)


def sat_to_msat(amount_sat: int) -> int:
    return amount_sat * MSAT_PER_SAT


def msat_to_sat_floor(amount_msat: int) -> int:
    return amount_msat // MSAT_PER_SAT


def msat_to_sat_ceil(amount_msat: int) -> int:
    return ceil_div(amount_msat, MSAT_PER_SAT)


def format_sats(amount_msat: int) -> str:
    """msats as sats with exactly three decimals, e.g. 154 -> '0.154' (no float involved)."""
    sign = "-" if amount_msat < 0 else ""
    whole, frac = divmod(abs(amount_msat), MSAT_PER_SAT)
    return f"{sign}{whole}.{frac:03d}"


def sub_sat_note(msats: int) -> str:
    """Why `msats` (< 1 sat) cannot leave a key: said in refunds and `/v1/balance`."""
    return (f"{msats} msats stay on this key: ecash moves in whole sats, so less than one sat"
            " cannot be paid out; it still pays for requests")

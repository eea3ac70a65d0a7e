"""bech32 (BIP-173) and bech32m (BIP-350): NIP-19 keys (`routstr.nostr`), NUT-26 payment
requests (`routstr.cashu.tokens`)."""

from __future__ import annotations

from collections.abc import Iterable

#: NIP-19: bech32 strings SHOULD be limited to 5000 characters.
MAX_BECH32_CHARS = 5000


class Bech32Error(ValueError):
    """Not a valid bech32 string, or not the NIP-19 entity that was expected."""


_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(_CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_BECH32_CONST = 1  # bech32


def _polymod(values: Iterable[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ v
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GEN[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], frm: int, to: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << to) - 1
    for value in data:
        acc = (acc << frm) | value
        bits += frm
        while bits >= to:
            bits -= to
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (to - bits)) & maxv)
    elif bits >= frm or (acc << (to - bits)) & maxv:
        raise Bech32Error("invalid padding in bech32 data")
    return out


_BECH32M_CONST = 0x2BC830A3  # BIP-350


def bech32_encode(hrp: str, data: bytes, *, m: bool = False) -> str:
    """bech32 (BIP-173) of `data` (bytes, regrouped into 5-bit words) under `hrp`; `m`:
    bech32m (BIP-350, e.g. NUT-26 payment requests), with no length limit."""
    if not hrp or hrp != hrp.lower() or any(not 33 <= ord(c) <= 126 for c in hrp):
        raise Bech32Error("invalid human-readable part")
    words = _convert_bits(data, 8, 5, pad=True)
    const = _BECH32M_CONST if m else _BECH32_CONST
    poly = _polymod([*_hrp_expand(hrp), *words, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[w] for w in words + checksum)


def bech32_decode(text: str, *, m: bool = False,
                  max_chars: int = MAX_BECH32_CHARS) -> tuple[str, bytes]:
    """(hrp, data bytes) of a bech32 (`m`: bech32m) string; raises `Bech32Error` on any
    defect."""
    if not isinstance(text, str) or not 8 <= len(text) <= max_chars:
        raise Bech32Error("bech32 string of invalid length")
    if any(not 33 <= ord(c) <= 126 for c in text):
        raise Bech32Error("invalid character in bech32 string")
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("mixed-case bech32 string")
    text = text.lower()
    sep = text.rfind("1")
    if sep < 1 or sep + 7 > len(text):
        raise Bech32Error("bech32 separator misplaced")
    hrp, rest = text[:sep], text[sep + 1 :]
    try:
        words = [_CHARSET_REV[c] for c in rest]
    except KeyError:
        raise Bech32Error("invalid character in bech32 data") from None
    if _polymod([*_hrp_expand(hrp), *words]) != (_BECH32M_CONST if m else _BECH32_CONST):
        raise Bech32Error("bech32 checksum mismatch")
    return hrp, bytes(_convert_bits(words[:-6], 5, 8, pad=False))



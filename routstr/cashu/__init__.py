"""Standalone Cashu wallet library.

Imports nothing from the rest of the node (server, ledger, db), so it can be audited alone.
Layers: secp256k1 -> bdhke -> cbor/tokens -> mint (NUT REST client) -> wallet.
"""

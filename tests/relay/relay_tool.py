"""An independent Nostr client for tests, run with the relay venv's python (`websockets`).

usage: relay_tool.py URL req FILTER_JSON     -> one stored event (JSON) per line, until EOSE
       relay_tool.py URL publish EVENT_JSON  -> the relay's OK message as a JSON array

Deliberately not the node's own WebSocket client or signature code: what this reads back from
the relay is what any other Nostr client would see.
"""

from __future__ import annotations

import json
import sys

from websockets.sync.client import connect

TIMEOUT_S = 10


def main() -> int:
    url, cmd, arg = sys.argv[1:4]
    with connect(url, open_timeout=TIMEOUT_S, close_timeout=1) as ws:
        if cmd == "req":
            ws.send(json.dumps(["REQ", "relay-tool", json.loads(arg)]))
            while True:
                msg = json.loads(ws.recv(timeout=TIMEOUT_S))
                if msg[0] == "EVENT" and msg[1] == "relay-tool":
                    print(json.dumps(msg[2], separators=(",", ":")))
                elif msg[0] in ("EOSE", "CLOSED"):
                    return 0
        elif cmd == "publish":
            event = json.loads(arg)
            ws.send(json.dumps(["EVENT", event]))
            while True:
                msg = json.loads(ws.recv(timeout=TIMEOUT_S))
                if msg[0] == "OK":  # nostr-relay answers a refused event with an empty id
                    print(json.dumps(msg))
                    return 0
                if msg[0] == "NOTICE":  # some relays answer a malformed event with a NOTICE
                    print(json.dumps(msg))
                    return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""An agent that lost its broker tries every node of the cluster before it backs off further.

paho doubles its reconnect wait at every failed attempt, so with four nodes the fourth was tried only
after 1 + 2 + 4 s of waiting (and a fifth node after 15 s). The link's node rotation now doubles the
wait once per full round of nodes. Real sockets: four listeners that take the TCP connection and close
it at once (a node that is going down), each noting when it was tried.
"""

from __future__ import annotations

import socket
import threading
import time

from edge_runtime.mqtt import MqttLink, parse_broker_url
from helpers import eventually


class _ClosingNode:
    """Accepts connections and closes them at once, noting the time of each."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.tries: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.tries.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_every_node_of_the_first_round_is_tried_after_the_shortest_wait_then_the_wait_doubles():
    nodes = [_ClosingNode() for _ in range(4)]
    link = MqttLink(parse_broker_url(",".join(f"mqtt://127.0.0.1:{n.port}" for n in nodes)), "rotating-agent",
                    min_backoff=1, max_backoff=30)
    try:
        link.start()
        eventually(lambda: len(nodes[0].tries) >= 2, 12)     # the first node again: a round and one more
        tries = sorted((t, i) for i, n in enumerate(nodes) for t in n.tries)
    finally:
        link.stop(timeout=2)
        for n in nodes:
            n.close()
    order = [i for _, i in tries]
    assert order[:5] == [0, 1, 2, 3, 0], f"nodes tried in the order {order}"
    waits = [b - a for (a, _), (b, _) in zip(tries, tries[1:5], strict=False)]
    # the first round: each next node after the 1 s minimum (paho alone: 1, 2, 4 s)
    assert all(w < 1.8 for w in waits[:3]), f"waits between the first round's nodes: {waits}"
    # the second round starts after a doubled wait: it does back off
    assert waits[3] > 1.6, f"waits: {waits}"

"""The metrics endpoint, scraped over real TCP and parsed by prometheus_client."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pupd.daemon.service.metrics import DaemonMetrics, serve_metrics


async def http_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return data


async def test_metrics_parse_with_prometheus_parser() -> None:
    m = DaemonMetrics()
    m.release_serial.set(2, component="app", version="2.0")
    m.bytes_received.inc(1500, peer="169.254.77.2:7770")
    m.bytes_received.inc(500, peer="169.254.77.2:7770")
    m.bytes_sent.inc(42, peer='we"ird\\peer')
    m.bans.inc(reason="corrupt-chunk")
    m.apply_seconds.set(0.25, component="app")
    m.rollbacks.inc(component="app", reason="health")
    m.peers.set(3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1", 0, m.registry)
        raw = await http_get(port, "/metrics")
        missing = await http_get(port, "/other")
        nursery.cancel_scope.cancel()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert missing.startswith(b"HTTP/1.1 404")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    recv = fams["p2pupd_peer_received_bytes"]
    assert recv.type == "counter"
    assert [(s.labels, s.value) for s in recv.samples if s.name.endswith("_total")] == [
        ({"peer": "169.254.77.2:7770"}, 2000.0)
    ]
    sent = fams["p2pupd_peer_sent_bytes"].samples[0]
    assert sent.labels == {"peer": 'we"ird\\peer'}
    assert fams["p2pupd_release_serial"].samples[0].labels == {"component": "app", "version": "2.0"}
    assert fams["p2pupd_apply_duration_seconds"].samples[0].value == 0.25
    assert fams["p2pupd_peers"].samples[0].value == 3
    assert fams["p2pupd_peer_bans"].samples[0].labels == {"reason": "corrupt-chunk"}

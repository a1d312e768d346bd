"""UcxTransportLog parses UCX's own protocol tables (lines as UCX 1.23 writes them)."""

from __future__ import annotations

import logging

from kv_transfer.ucx_transports import UcxTransportLog

SAMPLE = """\
[1.1] [vm:1:0]     ucp_context.c:2753 UCX  INFO  Version 1.23.0 (loaded from /x/libucp.so, git branch <unknown>, revision 65e342a)
[1.2] [vm:1:0]      ucp_worker.c:1997 UCX  INFO    dec-1 intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)
[1.3] [vm:1:0]   +--------+-------------+-------------------------------------------+
[1.3] [vm:1:0]   | dec-1 intra-node cfg#1                                           |
[1.3] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1.3] [vm:1:0]   +--------+-------------+-------------------------------------------+
[1.3] [vm:1:0]   |   1..16515 | zero-copy          | tcp/lo        |
[1.3] [vm:1:0]   +--------+-------------+-------------------------------------------+
[1.4] [vm:1:0]   | dec-1 intra-node cfg#1                                           |
[1.4] [vm:1:0]   | remote memory read by ucp_get*(multi) into host memory from host |
[1.4] [vm:1:0]   +--------+-------------+-------------------------------------------+
[1.4] [vm:1:0]   | Range  | Description |                  Config                   |
[1.4] [vm:1:0]   +--------+-------------+-------------------------------------------+
"""
REST = """\
[1.4] [vm:1:0]   | 0..inf | zero-copy   | cma/memory                                |
[1.4] [vm:1:0]   +--------+-------------+-------------------------------------------+
[1.5] [vm:1:0]   | dec-1 intra-node cfg#2                                           |
[1.5] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.5] [vm:1:0]   | 0..inf | multi-frag copy-in | tcp/lo |
[1.55] [vm:1:0]   | dec-1 intra-node cfg#2                                           |
[1.55] [vm:1:0]   | remote memory read by ucp_get*(multi) into cuda/GPU0 from cuda/dev[1] |
[1.55] [vm:1:0]   | 0..inf | software emulation | tcp/lo                                  |
[1.6] [vm:1:0]          ucp_ep.c:1 UCX  WARN  something odd
[1.7] [vm:1:0]   | half a li"""


def test_parses_read_and_write_protocols_across_partial_writes(tmp_path, caplog):
    path = tmp_path / "ucx.log"
    path.write_text(SAMPLE)
    ucx = UcxTransportLog()
    ucx.log_path = str(path)
    first = ucx.refresh()
    assert ucx.version == "1.23.0"
    assert first == ["endpoint lanes: intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)"]
    with path.open("a") as f:  # the rest of the table arrives later, ending mid-line
        f.write(REST)
    with caplog.at_level(logging.INFO, logger="kv_transfer.ucx_transports"):
        ucx.report("prefill-1")
    assert ucx.protocols == {"read into host from host": ["0..inf zero-copy cma/memory"],
                             "write from host to host": ["0..inf multi-frag copy-in tcp/lo"],
                             "read into cuda/GPU0 from cuda/dev[1]": ["0..inf software emulation tcp/lo"]}
    levels = {r.getMessage().split(": ", 1)[1]: r.levelname for r in caplog.records if "selected" in r.getMessage()}
    assert levels["read into host from host: 0..inf zero-copy cma/memory"] == "INFO"
    assert levels["read into cuda/GPU0 from cuda/dev[1]: 0..inf software emulation tcp/lo (KV moves over TCP / emulated "
                  "RMA: expect ~0.1-1 GB/s; check UCX_TLS, UCX_NET_DEVICES, UCX_CUDA_IPC_ENABLE_GET_ZCOPY)"] == "WARNING"
    assert levels["write from host to host: 0..inf multi-frag copy-in tcp/lo (KV moves over TCP / emulated RMA: expect "
                  "~0.1-1 GB/s; check UCX_TLS, UCX_NET_DEVICES, UCX_CUDA_IPC_ENABLE_GET_ZCOPY)"] == "WARNING"
    assert any("something odd" in r.getMessage() for r in caplog.records)
    assert ucx.refresh() == []  # nothing new; the half line is not parsed yet
    summary = ucx.summary()
    assert summary["ucx_version"] == "1.23.0" and "UCX_NET_DEVICES" in summary["env"]

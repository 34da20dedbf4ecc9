"""Test and benchmark helpers; nothing in the runtime (training, coordinator, transports) imports them.

- `netns`: emulated hosts on one Linux machine (network namespaces, `tc tbf`, latency proxies;
  needs root), for the multi-host tests and `scripts/bench_wan.py`;
- `faults`: fault injection, a ZeroMQ link proxy that mangles messages and a transport wrapper
  that fails collectives, for `tests/test_faults.py` and the chaos benchmark.
"""

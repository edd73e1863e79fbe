"""The places the product runs in for tests and benchmarks: its processes on free loopback ports
(launch), LAN hosts in network namespaces with shaped links (netsim). No product module imports it."""

"""Fault injection for tests and benchmarks: a UDP proxy that delays, reorders and drops datagrams."""

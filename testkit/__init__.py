"""Support for dcp-hf's tests and benchmarks, not part of the installed package: the S3 server
they start, two simulated hosts, planning simulated for many ranks, and the Megatron oracle.
Run from the repository root (pytest and ``python -m benchmarks`` do)."""

"""Throughput and memory benchmarks of the pipeline against the sandbox.

``python -m benchmarks.run`` runs the workloads W1 to W4 and writes
``benchmarks/results/latest.json``; docs/benchmarks.md describes the workloads and records
the results.
"""

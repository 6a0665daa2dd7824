"""Workflows that tie train/ and decode/ together: the sweep, export to the Hub, the report, benchmarks."""

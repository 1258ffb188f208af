"""Straightforward implementations the benchmarks compare against (not used by the library)."""

"""One place that starts a subnet from a scenario (tests/harness/subnet.py)."""

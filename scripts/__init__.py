"""Tools for people: the local subnet launcher, data preparation and benchmarks."""

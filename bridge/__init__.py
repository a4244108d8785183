"""The coordination service a subnet owner runs: a state machine over runs, miners, samples, hops,
inner steps and rounds (no I/O: time and randomness passed in); its SQLite or PostgreSQL
persistence, which writes what the transitions changed (tracked, never declared by hand); a thin
FastAPI layer; and presigned S3 URLs.
It never imports torch or resbm: object sizes and the check of a disputed hop output come from the
torch-free `spec` package (tests/test_import_rules.py starts a bridge and checks).
"""

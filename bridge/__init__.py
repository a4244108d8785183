"""The coordination service a subnet owner runs: a state machine over runs, miners, samples, hops,
inner steps and rounds (no I/O: time and randomness passed in); its SQLite persistence, which
writes what the transitions changed (tracked, never declared by hand); a thin FastAPI layer; and
presigned S3 URLs.
It imports resbm (and so torch) only for the run's code size at startup and to judge a disputed
hop output (a few KB, decoded by resbm.codec); it never computes on tensors.
"""

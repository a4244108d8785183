"""The coordination service a subnet owner runs: a pure state machine over runs, miners, samples,
hops, inner steps and rounds; its SQLite persistence; a thin FastAPI layer; and presigned S3 URLs.
It imports resbm (and so torch) only for the run's code size at startup and to judge a disputed
hop output (a few KB, decoded by resbm.codec); it never computes on tensors.
"""

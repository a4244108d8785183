"""The coordination service a subnet owner runs: a pure state machine over runs, miners, samples,
hops, inner steps and rounds; its SQLite persistence; a thin FastAPI layer; and presigned S3 URLs.
It never touches tensors and never imports torch.
"""

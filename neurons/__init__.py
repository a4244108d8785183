"""Entry points that participants run: `miner.py` serves one pipeline stage, `validator.py` replays
miners' work, scores verified throughput and sets weights. Their loops, stage compute, audits and
scoring live beside them.
"""

"""Everything that crosses a process boundary: versioned wire messages (pydantic), btauth/1
request signing and verification, and the `Chain` interface with its LocalChain (SQLite) and
BittensorChain (bittensor 11 SDK) backends. Never imports torch.
"""

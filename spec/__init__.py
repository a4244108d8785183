"""What every process of the subnet agrees on, without torch: the model config and each stage's
parameter shapes, the byte layout and exact size of every tensor codec (with the activation
codec's verifying decoder), the sharded sync's layout and merger assignment, and the dataset
manifest format. `resbm` builds the tensors on top of it; the bridge uses it to size and check
objects without ever loading torch (docs/ARCHITECTURE.md, "Packages and what they may import").
Imports only the standard library, numpy and pydantic.
"""

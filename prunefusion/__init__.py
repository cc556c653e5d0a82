"""prunefusion: serve layer-pruned LLMs and a Transfusion model over gRPC."""

__version__ = "0.1.0"

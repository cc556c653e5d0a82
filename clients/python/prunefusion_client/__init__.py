"""Client for the prunefusion gRPC API v1 (depends only on grpcio + protobuf)."""

from prunefusion_client.client import AsyncClient, Client, GenerateOptions, ImageOptions, score_request, vectors
from prunefusion_client.connection import Connection

__all__ = ["AsyncClient", "Client", "Connection", "GenerateOptions", "ImageOptions", "score_request", "vectors"]

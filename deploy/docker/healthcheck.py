#!/opt/venv/bin/python
"""Docker HEALTHCHECK: exit 0 when the server's grpc.health.v1 says SERVING for the whole server (service "").

The target is $PRUNEFUSION_HEALTH_TARGET (host:port, plaintext), or the first argument. With server.tls, point it
at the plaintext health-only port (server.health_port). NOT_SERVING (loading, draining), no answer, or an error
within $PRUNEFUSION_HEALTH_TIMEOUT seconds (default 3) exits 1.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PRUNEFUSION_HEALTH_TARGET", "127.0.0.1:50051")
    timeout = float(os.environ.get("PRUNEFUSION_HEALTH_TIMEOUT", "3"))
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name}: {err.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())

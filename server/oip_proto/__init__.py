"""The Open Inference Protocol's gRPC messages and service, generated from `grpc_service.proto`.

After changing the `.proto`, regenerate the modules beside it (needs `grpcio-tools`, in the `dev` extra):
`python -m monaserve.server.oip_proto.generate`; `tests/test_grpc.py` fails while they are stale.
"""

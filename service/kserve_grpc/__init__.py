"""The KServe v2 gRPC API (server.py), over the messages of proto/kserve_v2.proto."""

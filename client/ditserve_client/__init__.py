"""ditserve's client SDK: grpcio and protobuf only, no torch."""

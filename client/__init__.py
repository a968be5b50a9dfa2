"""gRPC client for the fasterrcnn ensemble, and a launcher for a local tritonserver."""

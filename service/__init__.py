"""The control plane: controller and scheduling, metadata store, HTTP API, CLI."""

"""The data plane: brokers, artifact stores, materializers, step execution, worker runtime."""

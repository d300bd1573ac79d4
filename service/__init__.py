"""Phalanx's serving side: the gRPC inference service, its batcher, model holder, metrics and clients."""

"""Station runtime: frame sources, ONNX inference, decision policy, local store and outbox."""

"""The retrieval-augmented multimodal reader, its answer vocabulary and training."""

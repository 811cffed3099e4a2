"""Stage 2, activations: the PyTorch stage that records the residual stream entering a
block and turns prompt pairs into a steering vector (model loading, recording, methods)."""

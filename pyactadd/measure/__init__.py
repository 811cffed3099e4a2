"""What steering does: perplexity ratios, next-token shifts, the layer x coefficient sweep
and its figure."""

"""What steering does: perplexity ratios, next-token shifts, the layer x coefficient sweep
and its figure.

``perplexity`` scores many sentences per llama_decode; ``evaluation`` measures one steering
setting (``pyactadd eval``); ``sweep`` steps through layers x coefficients and recommends a
cell (``pyactadd sweep``); ``plots`` draws the sweep figure; ``report`` builds what the two
commands print and write as JSON."""

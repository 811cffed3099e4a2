"""Stage 4, engine to tokens: the C++ engine attached to a ``llama_cpp.Llama``, steered
generation, and layers placed on RPC workers."""

"""Stage 4, engine to tokens: the C++ engine attached to a ``llama_cpp.Llama``, steered
generation (one prompt, or many sequences with their own steering in one continuous
batch), and layers placed on RPC workers."""

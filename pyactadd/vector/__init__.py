"""Stage 3, the steering file: the vector value object, layer numbering, the GGUF format
and the foreign formats other tools write.

Needs only numpy and gguf (no torch, no llama.cpp), so the converters run on their own.
"""

from pyactadd.vector.layers import check_layer, from_llama_index, to_llama_index
from pyactadd.vector.value import ModelFingerprint, SteeringVector

__all__ = ["ModelFingerprint", "SteeringVector", "check_layer", "from_llama_index", "to_llama_index"]

#!/usr/bin/env python3
"""Convert a steering file from another tool to a stock llama.cpp control vector.

    python convert/convert_to_control_vector.py SOURCE -o OUT.gguf [--layer-convention block-input|block-output]
        [--shift-layers] [--layer L|A-B|A,B] [--stacked] [--reduce row:K|mean|sum] [--scale S]

SOURCE: a repeng or dialz ``export_gguf`` file, a cvector-generator file, a pyactadd file,
or tensors in .safetensors / .npy / .npz / .pt (steering-vectors' ``layer_activations``).
Runs from a plain checkout with only gguf and numpy installed (safetensors for
.safetensors, torch for .pt); the code is ``pyactadd convert --llama-cpp``'s, so the output
is byte-identical. convert/README.md has examples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if "NO_LOCAL_PYACTADD" not in os.environ:
        # As llama.cpp's scripts find gguf-py: the checkout's package, no install needed.
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from pyactadd.vector.convert.script import to_control_vector

    sys.exit(to_control_vector())

#!/usr/bin/env python3
"""Convert a llama.cpp control vector to a pyactadd steering file or to per-layer tensors.

    python convert/convert_from_control_vector.py SOURCE -o OUT.gguf|OUT.safetensors|OUT.npz|OUT.pt
        [--to-convention block-input|block-output] [--align front|back|all] [--layer L|A-B|A,B]
        [--shift-layers] [--scale S]

The way back from convert_to_control_vector.py: a ``.gguf`` output is a pyactadd file
(``pyactadd run --steer`` reads it; ``--align front`` applies the row at the prompt's
first position only), a tensor output numbers its arrays in ``--to-convention``. Runs
from a plain checkout with only gguf and numpy installed (safetensors for .safetensors,
torch for .pt); the code is ``pyactadd convert``'s. convert/README.md has examples.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if "NO_LOCAL_PYACTADD" not in os.environ:
        # As llama.cpp's scripts find gguf-py: the checkout's package, no install needed.
        sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from pyactadd.vector.convert.script import from_control_vector

    sys.exit(from_control_vector())

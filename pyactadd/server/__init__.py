"""``pyactadd serve``: an OpenAI-compatible HTTP server with per-request steering, and a playground page.

One worker thread owns the model; requests queue in a bounded queue and are served one at
a time (or, with ``--parallel N``, up to N in one continuous batch), each with its own steering (vectors named in the request, loaded from
``--vectors DIR`` or uploaded). Modules, one job each:

* :mod:`.schemas`: request bodies and the JSON error shape.
* :mod:`.registry`: the named vectors and whether each fits the model.
* :mod:`.plan`: a request → prompt token ids + steering + sampling (the functions ``pyactadd run`` uses).
* :mod:`.worker`: the queue and the thread that runs the model.
* :mod:`.batch_worker`: the same with ``--parallel N``: N requests in one continuous batch.
* :mod:`.app`: the FastAPI application (routes, streaming, limits, API key).
* :mod:`.process`: the listening socket, the uvicorn loop, and the restart in place after a lost RPC worker.
"""

from __future__ import annotations

from pyactadd.server.app import ServerConfig, create_app
from pyactadd.server.registry import VectorEntry, VectorRegistry

__all__ = ["ServerConfig", "VectorEntry", "VectorRegistry", "create_app"]

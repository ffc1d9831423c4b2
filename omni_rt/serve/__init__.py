"""``omni-rt serve``: an OpenAI-compatible HTTP/WebSocket server over the public ``omni_rt.Runtime``.

Needs the ``serve`` extra (``pip install "omni_rt[serve]"``: FastAPI, uvicorn). Imports only omni_rt's public API.
"""

"""The HTTP side of ``neuroscope serve``: the OpenAI chat API (:8080) and the feature stream (:8081).

Both are Litestar apps served by uvicorn on one event loop (``run.py``). They talk to the model only
through ``neuroscope.engine.Engine`` and to the stream only through ``neuroscope.hub.Hub``.
"""

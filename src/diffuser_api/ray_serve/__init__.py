"""Scale-out on Ray Serve (extra ``diffuser-api[ray]``): an ingress deployment serving the very
same FastAPI app, and one model deployment per models-file entry whose replicas run our engine.

Only ``application.py`` and ``remote.py`` import Ray; ``wire.py`` and ``serve_config.py`` do not,
so the Serve config can be written (``diffuser-api ray-config``) without Ray installed.
"""

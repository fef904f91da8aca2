"""The command-line client: ``diffuser-api generate|edit|vary|models`` against a running server.

It talks to the server only over HTTP and WebSocket, as any user's program would, and imports
nothing of the server (no FastAPI, no torch), so it starts fast and works against any replica.
"""

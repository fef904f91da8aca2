"""HTTP: FastAPI routers, OpenAI wire schemas and the one error table. Imports no torch."""

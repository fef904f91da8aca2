"""Use cases between the API and the engine: check, decode, run, encode, store."""

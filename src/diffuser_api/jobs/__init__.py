"""Async jobs: requests stored in a database, run by a dispatcher, followed through events.

Nothing here imports FastAPI: ``api/jobs.py`` shapes what this package returns.
"""

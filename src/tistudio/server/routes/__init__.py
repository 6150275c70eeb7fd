"""The HTTP API by resource: each module is one FastAPI router, included by app.create_app."""

from __future__ import annotations

from tistudio.server.routes import a1111, embeddings, generation, jobs, page, photos, training

ROUTERS = [page.router, photos.router, embeddings.router, training.router, generation.router, jobs.router, a1111.router]

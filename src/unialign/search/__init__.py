"""Image search over a trained model: `index build` (embed + FAISS + SQLite), `search`, `serve`.

Modules: store (index directory), build (embedding in committed chunks), ann (FAISS index
choice), query (Searcher), app (FastAPI + web page), cli (argparse commands). Nothing is
imported here, so the CLI can register the commands without loading FAISS or FastAPI.
"""

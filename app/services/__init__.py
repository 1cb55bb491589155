"""Services: every rule and transaction of Lethe lives here, below the HTTP layer.

Each public function takes a SQLAlchemy `Session`, does its work in one transaction and
commits it (or raises a `LetheError` and leaves nothing behind). Handlers and the worker
call these functions and nothing lower.
"""

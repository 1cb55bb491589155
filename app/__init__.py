"""Lethe's service: settings, errors, database, services, HTTP API, dispatch and sweeper.

Importing `app` never imports torch, never reads the environment and never connects to a
database; build the API with `app.main.create_app(settings)`.
"""

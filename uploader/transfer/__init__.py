"""Moving bytes to and from a store: parallel parts, sha256, retries, one adapter per backend.

Nothing here imports ``uploader.config``: backends take resolved settings.
"""

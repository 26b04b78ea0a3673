"""Contracts shared by the fashionrec services: settings, task payloads, storage, API schemas.

Nothing here holds service logic; each service imports only these contracts from the others.
"""

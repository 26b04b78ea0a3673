"""Contracts shared by the fashionrec services: settings, task payloads, storage, API schemas.

Besides the contracts, the few helpers more than one service needs, in one copy: atomic file
writes and sha256 (`files`), the operator commands' progress bar (`progress`), the logging setup
of every entry point (`logging_setup`) and the request id carried across them (`request_id`).
Nothing here holds service logic; each service imports only this package of the others
(`make lint` checks it: [tool.importlinter] in pyproject.toml).
"""

"""Databases as an older Grapevine left them, for the tests of the store's migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from peer.runtime.store import DB_NAME, MIGRATIONS


def database_at_version(
    data_dir: Path, version: int, rows: Iterable[tuple[str, tuple[object, ...]]]
) -> None:
    """Write `data_dir`'s database at schema `version`, then each (statement, parameters)."""
    db = sqlite3.connect(data_dir / DB_NAME)
    try:
        with db:
            db.execute("CREATE TABLE schema_version (version INTEGER)")
            db.execute("INSERT INTO schema_version VALUES (?)", (version,))
            for statements in MIGRATIONS[:version]:
                for statement in statements:
                    db.execute(statement)
            for statement, parameters in rows:
                db.execute(statement, parameters)
    finally:
        db.close()

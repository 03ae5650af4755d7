"""The study database: SQLite in WAL mode, one short transaction per request.

A vote is committed (``synchronous=FULL``) before the response that leads to the next pair is
sent, so a killed server loses nothing a rater was told was saved. Invite and admin tokens are
stored as SHA-256 hashes: the database alone does not let anyone in.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ccp.config import ConfigError
from ccp.study.design import StudyDesign, find_samples, plan_rater

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_hash TEXT UNIQUE NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, rater_id INTEGER NOT NULL REFERENCES raters(id), position INTEGER NOT NULL,
    method_left TEXT NOT NULL, method_right TEXT NOT NULL, image_left TEXT NOT NULL, image_right TEXT NOT NULL,
    sample_index INTEGER NOT NULL, broken_side TEXT, shown_at REAL,
    UNIQUE (rater_id, position));
CREATE TABLE IF NOT EXISTS votes (
    pair_id INTEGER PRIMARY KEY REFERENCES pairs(id), choice TEXT NOT NULL CHECK (choice IN ('left', 'right')),
    voted_at REAL NOT NULL);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@contextlib.contextmanager
def connect(db_path: str | Path, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection for one unit of work; with `write`, one ``BEGIN IMMEDIATE`` transaction committed on exit."""
    conn = sqlite3.connect(db_path, timeout=60, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        if write:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            yield conn
    finally:
        conn.close()


@dataclass
class Invite:
    rater: str
    token: str


def open_study(db_path: str | Path, design: StudyDesign, samples_dir: str | Path) -> tuple[list[Invite], str | None]:
    """Create or reopen the study database; plan the pairs of raters not in it yet.

    Returns the new raters' invites and, on creation, the admin token (both shown once: only
    their hashes are stored). A database made for another design or samples folder is refused."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    samples = find_samples(samples_dir, design)
    if not db_path.exists():  # owner-only, like the links: it holds the forms' secret (SQLite gives -wal/-shm the same mode)
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    fingerprint = json.dumps({"design": design.fingerprint(), "samples": str(Path(samples_dir).resolve())}, sort_keys=True)
    with connect(db_path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: readers never block the vote writer
        conn.executescript(SCHEMA)
    admin_token = None
    invites = []
    with connect(db_path, write=True) as conn:
        stored = conn.execute("SELECT value FROM meta WHERE key = 'design'").fetchone()
        if stored is None:
            admin_token = secrets.token_urlsafe(24)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("design", fingerprint), ("admin_token_hash", token_hash(admin_token)),
                ("secret", secrets.token_hex(32)), ("samples", str(Path(samples_dir).resolve()))])
        elif stored["value"] != fingerprint:
            raise ConfigError(f"{db_path} was made for another study design or samples folder "
                              f"({stored['value']}); use a new db=PATH, or the design and samples it was made with")
        known = {r["name"] for r in conn.execute("SELECT name FROM raters")}
        for name in design.raters:
            if name in known:
                continue
            token = secrets.token_urlsafe(24)
            rater_id = conn.execute("INSERT INTO raters (name, token_hash, created) VALUES (?, ?, ?)",
                                    (name, token_hash(token), time.time())).lastrowid
            conn.executemany(
                "INSERT INTO pairs (rater_id, position, method_left, method_right, image_left, image_right, "
                "sample_index, broken_side) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(rater_id, p.position, p.method_left, p.method_right, p.image_left, p.image_right,
                  p.sample_index, p.broken_side) for p in plan_rater(design, samples, name)])
            invites.append(Invite(name, token))
    return invites, admin_token


def reset_token(db_path: str | Path, rater: str | None = None) -> str:
    """A new invite token for `rater` (also un-revokes it), or a new admin token when `rater` is None."""
    token = secrets.token_urlsafe(24)
    with connect(db_path, write=True) as conn:
        if rater is None:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'admin_token_hash'", (token_hash(token),))
        elif conn.execute("UPDATE raters SET token_hash = ?, revoked = 0 WHERE name = ?",
                          (token_hash(token), rater)).rowcount != 1:
            raise ConfigError(f"no rater named {rater!r} in {db_path}; add it to study.raters and serve once")
    return token


def meta(conn: sqlite3.Connection, key: str) -> str:
    return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]


def is_admin(conn: sqlite3.Connection, token: str) -> bool:
    return hmac.compare_digest(meta(conn, "admin_token_hash"), token_hash(token))


def rater_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    """The rater with this invite token, unless revoked."""
    return conn.execute("SELECT * FROM raters WHERE token_hash = ? AND revoked = 0", (token_hash(token),)).fetchone()


def read_votes(db_path: str | Path) -> list[dict]:
    """Every vote with its pair and rater: the analysis input."""
    with connect(db_path) as conn:
        rows = conn.execute(
            "SELECT r.name AS rater, r.revoked, p.position, p.method_left, p.method_right, p.sample_index, "
            "p.broken_side, v.choice, v.voted_at FROM votes v JOIN pairs p ON p.id = v.pair_id "
            "JOIN raters r ON r.id = p.rater_id ORDER BY r.name, p.position").fetchall()
    return [dict(r) for r in rows]

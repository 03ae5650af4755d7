"""The study app as a real server (uvicorn in a subprocess, `ccp-study serve`): a kill -9 loses no
acknowledged vote, and 50 concurrent raters on the loopback address for a bounded time lose none."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_study import make_samples, next_form


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ccp-study serve` in its own process, started and stopped by the test."""

    def __init__(self, samples: Path, db: Path, *overrides: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "ccp.cli.study", "serve", "study=smoke", f"samples={samples}", f"db={db}",
                     f"port={self.port}", *overrides]
        self.db = db
        self.proc = None

    started: list[subprocess.Popen] = []  # stopped after each test, whatever happened in it

    def start(self, timeout: float = 30) -> Server:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        Server.started.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stdout.read()}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("server did not start in time")

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def tokens(self) -> dict[str, str]:
        lines = (self.db.parent / "invites.txt").read_text().splitlines()
        return {name: link.rsplit("/", 1)[1] for name, link in (line.split("\t") for line in lines)}


def votes_in(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0] for row in conn.execute("SELECT pair_id FROM votes")}


def rate(client: httpx.Client, url: str, token: str, acknowledged: set, stop: threading.Event, errors: list) -> None:
    """Answer pairs until the study ends or `stop`; a vote answered with 303 is acknowledged."""
    while not stop.is_set():
        try:
            page = client.get(f"{url}/r/{token}")
            if "pair_id" not in page.text:
                return
            form = next_form(page.text)
            response = client.post(f"{url}/r/{token}/vote", data={**form, "choice": "left"})
        except httpx.TransportError:
            return  # the server went away (killed): what was acknowledged before must be kept
        if response.status_code != 303:
            errors.append((response.status_code, response.text[:200]))
            return
        acknowledged.add(form["pair_id"])


@pytest.fixture(autouse=True)
def no_server_left():
    yield
    while Server.started:
        proc = Server.started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def study_dirs(tmp_path):
    return make_samples(tmp_path / "samples"), tmp_path / "study" / "study.sqlite"


@pytest.mark.timeout(90)
def test_votes_survive_a_server_kill(study_dirs):
    samples, db = study_dirs
    overrides = ("study.raters=6", "study.pairs_per_rater=1000")  # more than 2 s of work
    server = Server(samples, db, *overrides).start()
    tokens = server.tokens()
    acknowledged: set[int] = set()
    stop, errors = threading.Event(), []
    with httpx.Client(timeout=10) as client:
        threads = [threading.Thread(target=rate, args=(client, server.url, t, acknowledged, stop, errors))
                   for t in tokens.values()]
        for t in threads:
            t.start()
        # kill once votes are flowing, not after a fixed 1.5 s: a loaded (3x slower) machine may not have
        # acknowledged the 6 votes asserted below by then; 12 = two rounds of six raters, well inside 10**3 pairs each
        deadline = time.monotonic() + 45
        while len(acknowledged) < 12 and not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # kill -9 while six raters are voting
        for t in threads:
            t.join(timeout=20)
    assert not errors
    assert len(acknowledged) >= 6, "too few votes before the kill to test anything"
    stored = votes_in(db)
    assert acknowledged <= stored  # nothing a rater was told was saved is lost
    assert len(stored - acknowledged) <= len(tokens)  # at most the one in flight per rater
    # restart on the same database: every rater resumes after their last stored answer
    server = Server(samples, db, *overrides).start()
    try:
        with httpx.Client(timeout=10) as client:
            with sqlite3.connect(db) as conn:
                done = dict(conn.execute("SELECT r.name, COUNT(v.pair_id) FROM raters r JOIN pairs p ON p.rater_id = r.id "
                                         "LEFT JOIN votes v ON v.pair_id = p.id GROUP BY r.id").fetchall())
            for name, token in tokens.items():
                page = client.get(f"{server.url}/r/{token}")
                assert f"Pair {done[name] + 1} of 1002" in page.text
            form = next_form(client.get(f"{server.url}/r/{tokens['rater01']}").text)
            assert client.post(f"{server.url}/r/{tokens['rater01']}/vote", data={**form, "choice": "right"}).status_code == 303
        assert form["pair_id"] in votes_in(db)
    finally:
        server.kill(signal.SIGTERM)


@pytest.mark.timeout(90)
def test_fifty_concurrent_raters_lose_no_vote(study_dirs):
    samples, db = study_dirs
    server = Server(samples, db, "study.raters=50", "study.pairs_per_rater=40", "study.attention_checks=2").start()
    tokens = server.tokens()
    assert len(tokens) == 50
    acknowledged: set[int] = set()
    stop, errors = threading.Event(), []
    limits = httpx.Limits(max_connections=60)
    try:
        with httpx.Client(timeout=20, limits=limits) as client:
            threads = [threading.Thread(target=rate, args=(client, server.url, t, acknowledged, stop, errors))
                       for t in tokens.values()]
            started = time.monotonic()
            for t in threads:
                t.start()
            stop.wait(12)  # bounded: the raters stop after 12 s whatever their progress
            stop.set()
            for t in threads:
                t.join(timeout=25)
            elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads)
        assert elapsed < 30
    finally:
        server.kill(signal.SIGTERM)
    assert not errors, errors[:3]
    assert len(acknowledged) >= 100, f"only {len(acknowledged)} votes in {elapsed:.0f} s"
    stored = votes_in(db)
    assert stored == acknowledged
    with sqlite3.connect(db) as conn:
        raters_with_votes = conn.execute("SELECT COUNT(DISTINCT p.rater_id) FROM votes v JOIN pairs p ON p.id = v.pair_id").fetchone()[0]
        # one row per pair (primary key): a vote counted twice would show up here
        assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == len(acknowledged)
    assert raters_with_votes == 50  # all fifty were served concurrently, none starved
    print(f"{len(acknowledged)} votes from 50 raters in {elapsed:.1f} s")

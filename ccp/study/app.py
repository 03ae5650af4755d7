"""The rating web app (FastAPI, server-rendered): invite links, pairs, votes, the admin page.

Routes (every token is a path segment; an unknown or revoked one gets a bare 404):

    GET  /r/{token}                         the rater's next unanswered pair (marked shown), or the end page
    POST /r/{token}/vote                    pair_id, choice (left/right), csrf -> 303 to /r/{token}
    GET  /r/{token}/image/{pair_id}/{side}  a PNG of one of the rater's own pairs
    GET  /admin/{admin_token}               progress per rater and per method pair
    POST /admin/{admin_token}/revoke        rater, csrf

Forms carry an HMAC of the study's secret (a cross-site page cannot know it) and a request whose
Origin or Sec-Fetch-Site says it came from another site is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import io
import json
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import DictLoader, Environment, select_autoescape
from PIL import Image

from ccp.study.store import connect, is_admin, meta, rater_by_token
from ccp.study.templates import TEMPLATES

SIDES = ("left", "right")


class UnsafePath(Exception):
    pass


def sample_file(samples_root: Path, relative: str) -> Path:
    """`relative` inside `samples_root`, after resolving '..' and symlinks; anything else is refused."""
    path = (samples_root / relative).resolve()
    if not path.is_relative_to(samples_root) or not path.is_file():
        raise UnsafePath(relative)
    return path


def broken_png(path: Path, seed: int) -> bytes:
    """The attention check's obviously broken image: tiles shuffled, colours inverted, heavy noise."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    h, w = image.shape[:2]
    t = max(1, min(h, w) // 8)
    rng = np.random.default_rng(seed)
    tiles = [image[y:y + t, x:x + t] for y in range(0, h - h % t, t) for x in range(0, w - w % t, t)]
    order = rng.permutation(len(tiles))
    cols = (w - w % t) // t
    out = image.copy()
    for k, j in enumerate(order):
        y, x = (k // cols) * t, (k % cols) * t
        out[y:y + t, x:x + t] = tiles[j]
    out = 255 - out + rng.integers(-90, 90, size=out.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def create_app(db_path: str | Path, question: str, public_url: str | None = None) -> FastAPI:
    """The app over an existing study database (`ccp.study.store.open_study` makes it).

    `public_url`: the links' prefix behind a reverse proxy, whose origin forms may also come from."""
    allowed_hosts = {public_url.split("://", 1)[-1].split("/", 1)[0]} if public_url else set()
    db_path = str(db_path)
    with connect(db_path) as conn:
        secret = bytes.fromhex(meta(conn, "secret"))
        samples_root = Path(meta(conn, "samples")).resolve()
        study_name = json.loads(meta(conn, "design"))["design"]["name"]
    env = Environment(loader=DictLoader(TEMPLATES), autoescape=select_autoescape(default=True))
    templates = Jinja2Templates(env=env)
    app = FastAPI(title="ccp preference study", docs_url=None, redoc_url=None, openapi_url=None)

    def csrf_token(scope: str) -> str:
        return hmac.new(secret, scope.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(request: Request, scope: str, token: str) -> bool:
        if request.headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = request.headers.get("origin")
        # "null" (privacy settings, opaque origins) is left to the HMAC, which a foreign page cannot know
        if origin and origin != "null" and origin.split("://", 1)[-1] not in allowed_hosts | {request.headers.get("host")}:
            return False
        return hmac.compare_digest(csrf_token(scope), token or "")

    def message(request: Request, status: int, title: str, text: str) -> HTMLResponse:
        return templates.TemplateResponse(request, "message.html", {"title": title, "message": text}, status_code=status)

    def not_found(request: Request) -> HTMLResponse:
        return message(request, 404, "Not found", "This link is not valid. Ask the study's organiser for your invite link.")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"  # links are secrets: never sent to another site
        return response

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return not_found(request)

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rate(request: Request, token: str):
        with connect(db_path, write=True) as conn:
            rater = rater_by_token(conn, token)
            if rater is None:
                return not_found(request)
            total, done = conn.execute(
                "SELECT COUNT(*), COUNT(v.pair_id) FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id WHERE p.rater_id = ?",
                (rater["id"],)).fetchone()
            pair = conn.execute(
                "SELECT p.id FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
                "WHERE p.rater_id = ? AND v.pair_id IS NULL ORDER BY p.position LIMIT 1", (rater["id"],)).fetchone()
            if pair is None:
                return templates.TemplateResponse(request, "done.html", {"total": total})
            conn.execute("UPDATE pairs SET shown_at = ? WHERE id = ? AND shown_at IS NULL", (time.time(), pair["id"]))
        base = f"/r/{token}"
        return templates.TemplateResponse(request, "rate.html", {
            "question": question, "done": done, "total": total, "pair_id": pair["id"],
            "csrf": csrf_token(f"rater:{rater['id']}"), "vote_url": f"{base}/vote",
            "left_url": f"{base}/image/{pair['id']}/left", "right_url": f"{base}/image/{pair['id']}/right"})

    @app.post("/r/{token}/vote")
    def vote(request: Request, token: str, pair_id: int = Form(...), choice: str = Form(...), csrf: str = Form("")):
        with connect(db_path, write=True) as conn:
            rater = rater_by_token(conn, token)
            if rater is None:
                return not_found(request)
            if not csrf_ok(request, f"rater:{rater['id']}", csrf):
                return message(request, 403, "Refused", "This form did not come from the study's own page; reload the page.")
            if choice not in SIDES:
                return message(request, 400, "Bad answer", "choice must be 'left' or 'right'.")
            pair = conn.execute("SELECT id FROM pairs WHERE id = ? AND rater_id = ? AND shown_at IS NOT NULL",
                                (pair_id, rater["id"])).fetchone()
            if pair is None:
                return message(request, 409, "Refused", "This pair was not shown to you; reload the page.")
            # The first answer counts: a repeated submission (double click, resend) changes nothing.
            conn.execute("INSERT OR IGNORE INTO votes (pair_id, choice, voted_at) VALUES (?, ?, ?)",
                         (pair_id, choice, time.time()))
        return RedirectResponse(f"/r/{token}", status_code=303)

    @app.get("/r/{token}/image/{pair_id}/{side}")
    def image(request: Request, token: str, pair_id: int, side: str):
        if side not in SIDES:
            return not_found(request)
        with connect(db_path) as conn:
            rater = rater_by_token(conn, token)
            pair = rater and conn.execute("SELECT * FROM pairs WHERE id = ? AND rater_id = ?",
                                          (pair_id, rater["id"])).fetchone()
        if not pair:
            return not_found(request)
        try:
            path = sample_file(samples_root, pair[f"image_{side}"])
        except UnsafePath:
            return not_found(request)
        if pair["broken_side"] == side:
            return Response(broken_png(path, pair_id), media_type="image/png")
        return Response(path.read_bytes(), media_type="image/png")

    @app.get("/admin/{token}", response_class=HTMLResponse)
    def admin(request: Request, token: str):
        with connect(db_path) as conn:
            if not is_admin(conn, token):
                return not_found(request)
            raters = [dict(r) for r in conn.execute(
                "SELECT r.name, r.revoked, COUNT(p.id) AS total, COUNT(v.pair_id) AS voted, MAX(v.voted_at) AS last_vote, "
                "SUM(p.broken_side IS NOT NULL AND v.pair_id IS NOT NULL) AS checks_answered, "
                "SUM(p.broken_side IS NOT NULL AND v.choice = p.broken_side) AS checks_failed "
                "FROM raters r JOIN pairs p ON p.rater_id = r.id LEFT JOIN votes v ON v.pair_id = p.id "
                "GROUP BY r.id ORDER BY r.name")]
            rows = conn.execute("SELECT p.method_left, p.method_right, v.choice FROM pairs p "
                                "LEFT JOIN votes v ON v.pair_id = p.id WHERE p.broken_side IS NULL").fetchall()
        for r in raters:
            if r["last_vote"]:
                r["last_vote"] = datetime.datetime.fromtimestamp(r["last_vote"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        method_pairs: dict[tuple[str, str], dict] = {}
        for left, right, choice in rows:
            a, b = sorted((left, right))
            entry = method_pairs.setdefault((a, b), {"a": a, "b": b, "total": 0, "voted": 0, "wins_a": 0, "wins_b": 0})
            entry["total"] += 1
            if choice:
                entry["voted"] += 1
                entry["wins_a" if (left if choice == "left" else right) == a else "wins_b"] += 1
        return templates.TemplateResponse(request, "admin.html", {
            "name": study_name, "question": question, "raters": raters, "method_pairs": list(method_pairs.values()),
            "votes": sum(r["voted"] for r in raters), "total": sum(r["total"] for r in raters),
            "csrf": csrf_token("admin"), "revoke_url": f"/admin/{token}/revoke"})

    @app.post("/admin/{token}/revoke")
    def revoke(request: Request, token: str, rater: str = Form(...), csrf: str = Form("")):
        with connect(db_path, write=True) as conn:
            if not is_admin(conn, token):
                return not_found(request)
            if not csrf_ok(request, "admin", csrf):
                return message(request, 403, "Refused", "This form did not come from the admin page; reload it.")
            if conn.execute("UPDATE raters SET revoked = 1 WHERE name = ?", (rater,)).rowcount != 1:
                return message(request, 404, "No such rater", f"No rater is named {rater!r}.")
        return RedirectResponse(f"/admin/{token}", status_code=303)

    return app


"""The preference study (ccp.study): design, database, the web app's rules and the analysis.

The app is driven in-process with FastAPI's TestClient; tests/test_study_server.py runs the real
server (kill -9, 50 concurrent raters) and tests/test_study_browser.py a real browser.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ccp.config import ConfigError, compose

METHODS = ("ours", "dreambooth", "oft")
COLOURS = {"ours": (200, 40, 40), "dreambooth": (40, 200, 40), "oft": (40, 40, 200)}


# --- helpers shared with the other study tests -------------------------------------------------
def make_samples(root: Path, methods=METHODS, n: int = 6, size: int = 32) -> Path:
    """PNG samples laid out as ccp-eval keeps them: <root>/<method>/images/000123.png, one colour per method."""
    for method in methods:
        images = root / method / "images"
        images.mkdir(parents=True)
        for i in range(n):
            image = Image.new("RGB", (size, size), (235, 235, 225))
            r = size // 4 + (i * size) // (8 * n)  # image i differs from image j
            ImageDraw.Draw(image).ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r),
                                          fill=COLOURS.get(method, (128, 128, 128)))
            image.save(images / f"{i:06d}.png")
    return root


def study_config(samples: Path, db: Path, *overrides: str):
    return compose("study", ["study=smoke", f"samples={samples}", f"db={db}", *overrides])


def prepared(tmp_path, *overrides: str) -> dict:
    from ccp.study.run import prepare

    samples = make_samples(tmp_path / "samples")
    cfg = study_config(samples, tmp_path / "study" / "study.sqlite", *overrides)
    state = prepare(cfg)
    state["cfg"] = cfg
    state["samples"] = samples
    state["tokens"] = {i.rater: i.token for i in state["invites"]}
    return state


def next_form(html: str) -> dict:
    """pair_id and csrf of the rating page's form."""
    return {"pair_id": int(re.search(r'name="pair_id" value="(\d+)"', html).group(1)),
            "csrf": re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)}


def db_rows(db: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture
def study(tmp_path):
    from fastapi.testclient import TestClient

    from ccp.study.app import create_app

    state = prepared(tmp_path)
    state["client"] = TestClient(create_app(state["db"], state["design"].question), follow_redirects=False)
    return state


# --- design ----------------------------------------------------------------------------------
def test_plan_is_seeded_balanced_and_randomised(tmp_path):
    from ccp.study.design import design_from_config, find_samples, plan_rater

    samples_dir = make_samples(tmp_path / "s", n=10)
    cfg = study_config(samples_dir, tmp_path / "db", "study.pairs_per_rater=30", "study.attention_checks=3")
    design = design_from_config(cfg.study)
    samples = find_samples(samples_dir, design)
    plan = plan_rater(design, samples, "alice")
    assert plan == plan_rater(design, samples, "alice")
    assert plan != plan_rater(design, samples, "bob")
    checks = [p for p in plan if p.broken_side]
    comparisons = [p for p in plan if not p.broken_side]
    assert len(checks) == 3 and len(comparisons) == 30
    assert all(p.method_left == p.method_right and p.image_left == p.image_right for p in checks)
    assert Counter(frozenset((p.method_left, p.method_right)) for p in comparisons) == {
        frozenset(mp): 10 for mp in design.method_pairs()}
    assert {p.method_left for p in comparisons if "ours" in (p.method_left, p.method_right)} == {"ours", "dreambooth", "oft"}
    for p in plan:  # both sides show image i of their method: the same seed
        assert p.image_left == f"{p.method_left}/images/{p.sample_index:06d}.png"
        assert p.image_right == f"{p.method_right}/images/{p.sample_index:06d}.png"
    # the ten indices of a method pair are all different (the pool of 10 is not exhausted)
    ours_dreambooth = [p.sample_index for p in comparisons if {p.method_left, p.method_right} == {"ours", "dreambooth"}]
    assert len(set(ours_dreambooth)) == 10
    assert [p.position for p in plan] == list(range(33))


def test_ours_vs_each_only_pairs_ours(tmp_path):
    from ccp.study.design import design_from_config

    cfg = study_config(tmp_path, tmp_path / "db", "study.comparisons=ours_vs_each")
    assert design_from_config(cfg.study).method_pairs() == [("ours", "dreambooth"), ("ours", "oft")]


@pytest.mark.parametrize("override, message", [
    ("study.ours=nobody", "study.ours='nobody' is not one of"),
    ("study.comparisons=some", "study.comparisons='some'"),
    ("study.raters=[alice,alice]", "lists a name twice"),
    ("study.raters=['a b']", "not valid names"),
    ("study.pairs_per_rater=0", "at least 1"),
])
def test_bad_design_is_refused_with_the_fix(tmp_path, override, message):
    from ccp.study.design import design_from_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        design_from_config(study_config(tmp_path, tmp_path / "db", override).study)


def test_bad_samples_are_refused_with_the_fix(tmp_path):
    from ccp.study.design import design_from_config, find_samples

    design = design_from_config(study_config(tmp_path, tmp_path / "db").study)
    with pytest.raises(ConfigError, match="samples is not set"):
        find_samples(None, design)
    with pytest.raises(ConfigError, match="no such folder"):
        find_samples(tmp_path / "missing", design)
    make_samples(tmp_path / "s", methods=("ours", "dreambooth"))
    with pytest.raises(ConfigError, match=r"study.methods.oft: folder 'oft' is not a folder inside"):
        find_samples(tmp_path / "s", design)
    (tmp_path / "s" / "oft" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images named like 000123.png"):
        find_samples(tmp_path / "s", design)
    escaping = design_from_config(study_config(tmp_path, tmp_path / "db", "study.methods.oft=../elsewhere").study)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="not a folder inside samples"):
        find_samples(tmp_path / "s", escaping)


def test_ccp_sample_layout_is_read_too(tmp_path):
    """ccp-sample writes images/00012.png (5 digits): the index is the number."""
    from ccp.study.design import design_from_config, find_samples

    for m in METHODS:
        (tmp_path / m / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / m / "images" / "00012.png")
        (tmp_path / m / "images" / "grid.png").write_bytes(b"not a sample")
    found = find_samples(tmp_path, design_from_config(study_config(tmp_path, tmp_path / "db").study))
    assert found["oft"] == {12: "oft/images/00012.png"}


# --- database --------------------------------------------------------------------------------
def test_reopening_keeps_raters_adds_new_ones_and_refuses_another_design(tmp_path):
    from ccp.study.run import prepare

    state = prepared(tmp_path)
    db = state["db"]
    assert sorted(state["tokens"]) == ["alice", "bob"] and state["admin_token"]
    before = db_rows(db, "SELECT * FROM pairs ORDER BY id")
    again = prepare(study_config(state["samples"], db, "study.raters=[alice,bob,carol]"))
    assert [i.rater for i in again["invites"]] == ["carol"] and again["admin_token"] is None
    assert db_rows(db, "SELECT * FROM pairs WHERE id <= ? ORDER BY id", (len(before),)) == before
    assert len(db_rows(db, "SELECT * FROM pairs")) == 3 * 8
    assert (db.parent / "invites.txt").read_text().count("/r/") == 3
    assert (db.parent / "invites.txt").stat().st_mode & 0o077 == 0  # links are secrets
    with pytest.raises(ConfigError, match="made for another study design"):
        prepare(study_config(state["samples"], db, "study.pairs_per_rater=7"))
    assert db_rows(db, "PRAGMA journal_mode")[0][0] == "wal"
    assert all(f.stat().st_mode & 0o077 == 0 for f in db.parent.glob("study.sqlite*"))


# --- the app's rules ---------------------------------------------------------------------------
def test_a_rater_answers_everything_and_can_come_back(study):
    client, token, db = study["client"], study["tokens"]["alice"], study["db"]
    seen = []
    for k in range(4):
        page = client.get(f"/r/{token}")
        assert page.status_code == 200 and f"Pair {k + 1} of 8" in page.text
        form = next_form(page.text)
        seen.append(form["pair_id"])
        for side in ("left", "right"):
            image = client.get(f"/r/{token}/image/{form['pair_id']}/{side}")
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            Image.open(__import__("io").BytesIO(image.content)).verify()
        vote = client.post(f"/r/{token}/vote", data={**form, "choice": "left"})
        assert vote.status_code == 303 and vote.headers["location"] == f"/r/{token}"
        # committed before the next pair is shown: another connection sees it already
        assert db_rows(db, "SELECT choice FROM votes WHERE pair_id = ?", (form["pair_id"],)) == [("left",)]
    # "closing the page" and coming back: the next unanswered pair, not a new plan
    from fastapi.testclient import TestClient

    from ccp.study.app import create_app

    later = TestClient(create_app(db, "q"), follow_redirects=False)
    page = later.get(f"/r/{token}")
    assert "Pair 5 of 8" in page.text and next_form(page.text)["pair_id"] not in seen
    for _ in range(4):
        form = next_form(later.get(f"/r/{token}").text)
        assert later.post(f"/r/{token}/vote", data={**form, "choice": "right"}).status_code == 303
    done = later.get(f"/r/{token}")
    assert done.status_code == 200 and "all 8 pairs are answered" in done.text
    assert db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 8


def test_attention_check_shows_a_broken_image(study):
    client, token, db = study["client"], study["tokens"]["alice"], study["db"]
    check_id, side, image = db_rows(
        db, "SELECT p.id, p.broken_side, p.image_left FROM pairs p JOIN raters r ON r.id = p.rater_id "
            "WHERE r.name = 'alice' AND p.broken_side IS NOT NULL LIMIT 1")[0]
    other = "right" if side == "left" else "left"
    original = np.asarray(Image.open(study["samples"] / image).convert("RGB"), dtype=float)
    import io

    def served(s):
        return np.asarray(Image.open(io.BytesIO(client.get(f"/r/{token}/image/{check_id}/{s}").content)), dtype=float)

    assert np.array_equal(served(other), original)
    assert np.abs(served(side) - original).mean() > 60  # obviously broken, not a subtle change


def test_invalid_or_revoked_token_gets_nothing(study):
    client, db = study["client"], study["db"]
    alice = study["tokens"]["alice"]
    form = next_form(client.get(f"/r/{alice}").text)
    for bad in ("nope", alice[:-1] + ("A" if alice[-1] != "A" else "B"), ""):
        response = client.get(f"/r/{bad}")
        assert response.status_code == 404 and "pair_id" not in response.text
        assert client.get(f"/r/{bad}/image/{form['pair_id']}/left").status_code == 404
        assert client.post(f"/r/{bad}/vote", data={**form, "choice": "left"}).status_code in (404, 405)
    # revoked through the admin page: the same link now gets nothing, and its votes are refused
    admin = study["admin_token"]
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get(f"/admin/{admin}").text).group(1)
    assert client.post(f"/admin/{admin}/revoke", data={"rater": "alice", "csrf": csrf}).status_code == 303
    assert db_rows(db, "SELECT revoked FROM raters WHERE name = 'alice'") == [(1,)]
    assert client.get(f"/r/{alice}").status_code == 404
    assert client.get(f"/r/{alice}/image/{form['pair_id']}/left").status_code == 404
    assert client.post(f"/r/{alice}/vote", data={**form, "choice": "left"}).status_code == 404
    assert db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 0
    # a new link (ccp-study reset-link) lets alice back in; the old one stays dead
    from ccp.study.store import reset_token

    new = reset_token(db, "alice")
    assert client.get(f"/r/{new}").status_code == 200 and client.get(f"/r/{alice}").status_code == 404
    with pytest.raises(ConfigError, match="no rater named 'zed'"):
        reset_token(db, "zed")


def test_image_urls_cannot_escape_the_samples_folder(study, tmp_path):
    client, token, db = study["client"], study["tokens"]["alice"], study["db"]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(secret)
    pair_id = next_form(client.get(f"/r/{token}").text)["pair_id"]
    for url in (f"/r/{token}/image/{pair_id}/../../../../secret.png", f"/r/{token}/image/{pair_id}/..%2F..%2Fsecret.png",
                f"/r/{token}/image/{pair_id}/%2e%2e", f"/r/{token}/image/{pair_id}/top",
                f"/r/{token}/image/..%2F{pair_id}/left", "/../secret.png"):
        response = client.get(url)
        assert response.status_code in (404, 422) and response.content != secret.read_bytes()
    # even a database row pointing outside (or a symlink inside pointing out) is not served
    link = study["samples"] / "ours" / "images" / "link.png"
    link.symlink_to(secret)
    for bad in ("../secret.png", str(secret), "ours/images/link.png"):
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE pairs SET image_left = ? WHERE id = ?", (bad, pair_id))
        assert client.get(f"/r/{token}/image/{pair_id}/left").status_code == 404
    from ccp.study.app import UnsafePath, sample_file

    root = study["samples"].resolve()
    assert sample_file(root, "ours/images/000000.png") == root / "ours" / "images" / "000000.png"
    with pytest.raises(UnsafePath):
        sample_file(root, "ours/../../secret.png")


def test_a_vote_for_a_pair_not_shown_is_refused(study):
    client, db, tokens = study["client"], study["db"], study["tokens"]
    form = next_form(client.get(f"/r/{tokens['alice']}").text)
    alice_next = db_rows(db, "SELECT p.id FROM pairs p JOIN raters r ON r.id = p.rater_id "
                             "WHERE r.name = 'alice' AND p.id != ? ORDER BY p.position LIMIT 1", (form["pair_id"],))[0][0]
    bob_pair = db_rows(db, "SELECT p.id FROM pairs p JOIN raters r ON r.id = p.rater_id WHERE r.name = 'bob' LIMIT 1")[0][0]
    for pair_id in (alice_next, bob_pair, 10**6):
        response = client.post(f"/r/{tokens['alice']}/vote", data={**form, "pair_id": pair_id, "choice": "left"})
        assert response.status_code == 409 and "not shown to you" in response.text
    # bob's page was shown to bob, still not alice's to vote on
    client.get(f"/r/{tokens['bob']}")
    assert client.post(f"/r/{tokens['alice']}/vote", data={**form, "pair_id": bob_pair, "choice": "left"}).status_code == 409
    assert client.post(f"/r/{tokens['alice']}/vote", data={**form, "choice": "middle"}).status_code == 400
    assert db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 0
    # and someone else's image is not served either
    assert client.get(f"/r/{tokens['alice']}/image/{bob_pair}/left").status_code == 404


def test_double_submission_is_counted_once(study):
    client, token, db = study["client"], study["tokens"]["alice"], study["db"]
    form = next_form(client.get(f"/r/{token}").text)
    for choice in ("left", "left", "right"):
        assert client.post(f"/r/{token}/vote", data={**form, "choice": choice}).status_code == 303
    assert db_rows(db, "SELECT pair_id, choice FROM votes") == [(form["pair_id"], "left")]
    assert "Pair 2 of 8" in client.get(f"/r/{token}").text


def test_forms_are_protected_against_cross_site_requests(study):
    client, tokens, db = study["client"], study["tokens"], study["db"]
    form = next_form(client.get(f"/r/{tokens['alice']}").text)
    bob_csrf = next_form(client.get(f"/r/{tokens['bob']}").text)["csrf"]
    url = f"/r/{tokens['alice']}/vote"
    refused = [
        client.post(url, data={"pair_id": form["pair_id"], "choice": "left"}),
        client.post(url, data={**form, "csrf": "0" * 64, "choice": "left"}),
        client.post(url, data={**form, "csrf": bob_csrf, "choice": "left"}),
        client.post(url, data={**form, "choice": "left"}, headers={"Origin": "https://evil.example"}),
        client.post(url, data={**form, "choice": "left"}, headers={"Sec-Fetch-Site": "cross-site"}),
    ]
    assert [r.status_code for r in refused] == [403] * 5
    assert db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 0
    assert client.post(url, data={**form, "csrf": "0" * 64, "choice": "left"}, headers={"Origin": "null"}).status_code == 403
    same_site = client.post(url, data={**form, "choice": "left"}, headers={"Origin": "http://testserver"})
    assert same_site.status_code == 303 and db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 1
    # behind a reverse proxy the page's origin is the public one, not the Host the app sees
    from fastapi.testclient import TestClient

    from ccp.study.app import create_app

    proxied = TestClient(create_app(db, "q", public_url="https://study.example.org"), follow_redirects=False)
    form = next_form(proxied.get(f"/r/{tokens['alice']}").text)
    response = proxied.post(url, data={**form, "choice": "left"}, headers={"Origin": "https://study.example.org"})
    assert response.status_code == 303 and db_rows(db, "SELECT COUNT(*) FROM votes")[0][0] == 2
    assert proxied.post(url, data={**form, "choice": "left"}, headers={"Origin": "https://evil.example"}).status_code == 403
    admin = study["admin_token"]
    assert client.post(f"/admin/{admin}/revoke", data={"rater": "bob"}).status_code == 403
    assert client.post(f"/admin/{admin}/revoke", data={"rater": "bob", "csrf": form["csrf"]}).status_code == 403
    assert db_rows(db, "SELECT revoked FROM raters WHERE name = 'bob'") == [(0,)]


def test_admin_page_needs_its_own_token(study):
    client, tokens = study["client"], study["tokens"]
    for bad in ("", "x", tokens["alice"]):
        response = client.get(f"/admin/{bad}")
        assert response.status_code == 404 and "Raters" not in response.text
    form = next_form(client.get(f"/r/{tokens['alice']}").text)
    client.post(f"/r/{tokens['alice']}/vote", data={**form, "choice": "left"})
    page = client.get(f"/admin/{study['admin_token']}")
    assert page.status_code == 200
    rows = re.findall(r"<tr><td>(alice|bob)</td><td>(\d+)</td><td>(\d+)</td>", page.text)
    assert rows == [("alice", "1", "8"), ("bob", "0", "8")]
    pairs = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td>", page.text)
    assert sorted((a, b) for a, b, *_ in pairs) == [("dreambooth", "oft"), ("dreambooth", "ours"), ("oft", "ours")]
    assert sum(int(total) for *_, total in pairs) == 2 * 6  # attention checks are not method pairs
    assert client.post("/admin/wrong/revoke", data={"rater": "bob", "csrf": "x"}).status_code == 404


# --- analysis --------------------------------------------------------------------------------
def _vote(rater, left, right, choice, broken=None):
    return {"rater": rater, "method_left": left, "method_right": right, "choice": choice, "broken_side": broken,
            "revoked": 0, "position": 0, "sample_index": 0, "voted_at": 0.0}


DESIGN = {"name": "t", "question": "q", "ours": "ours", "methods": {"ours": "ours", "dreambooth": "dreambooth", "oft": "oft"}}


def test_analysis_win_rates_intervals_bradley_terry_and_exclusion():
    from ccp.study.analysis import AnalysisOptions, analyze_votes, to_markdown

    votes = []
    for r in range(6):
        name = f"r{r}"
        for k in range(10):  # ours beats dreambooth 8 of 10, oft 5 of 10, left/right both ways
            votes.append(_vote(name, "ours", "dreambooth", "left" if k < 8 else "right"))
            votes.append(_vote(name, "oft", "ours", "right" if k < 5 else "left"))
            votes.append(_vote(name, "dreambooth", "oft", "right" if k < 7 else "left"))
        votes.append(_vote(name, "ours", "ours", "right", broken="left"))  # passed check
    # a careless rater: always left, fails the check, would flip both results
    votes += [_vote("careless", "dreambooth", "ours", "left") for _ in range(200)]
    votes += [_vote("careless", "ours", "ours", "left", broken="left")]
    raters = [{"name": f"r{r}", "revoked": 0, "pairs": 31} for r in range(6)] + [
        {"name": "careless", "revoked": 0, "pairs": 201}, {"name": "gone", "revoked": 1, "pairs": 10}]
    votes += [_vote("gone", "dreambooth", "ours", "left")]
    result = analyze_votes(votes, raters, DESIGN, AnalysisOptions(resamples=500))
    assert sorted(result["excluded"]) == ["careless", "gone"]
    summary = {s["name"]: s for s in result["raters"]}
    assert summary["careless"]["checks_failed"] == 1 and "failed 1 of 1" in summary["careless"]["reason"]
    wr = result["win_rate"]
    assert wr["dreambooth"]["n"] == 60 and wr["dreambooth"]["rate"] == pytest.approx(0.8)
    assert wr["oft"]["rate"] == pytest.approx(0.5)
    assert wr["dreambooth"]["ci_low"] < 0.8 < wr["dreambooth"]["ci_high"] and wr["dreambooth"]["ci_low"] > 0.6
    assert wr["oft"]["ci_low"] < 0.5 < wr["oft"]["ci_high"]
    scores = result["bradley_terry"]["scores"]
    assert scores["ours"] > scores["oft"] > scores["dreambooth"]
    assert result["pref"]["dreambooth"]["ours_preferred_pct"] == pytest.approx(80)
    # a looser rule keeps the careless rater, and the result moves: the rule matters
    loose = analyze_votes(votes, raters, DESIGN, AnalysisOptions(max_failed_checks=1, resamples=200))
    assert loose["excluded"] == ["gone"] and loose["win_rate"]["dreambooth"]["rate"] < 0.3
    assert "| dreambooth | 80.0% |" in to_markdown(result)


def test_bootstrap_interval_narrows_with_more_raters():
    from ccp.study.analysis import AnalysisOptions, bootstrap_win_rate

    options = AnalysisOptions(resamples=2000)
    few = bootstrap_win_rate([(7, 10), (3, 10)], options)
    many = bootstrap_win_rate([(7, 10), (3, 10)] * 20, options)
    assert few[1] - few[0] > 2 * (many[1] - many[0])
    assert few[0] <= 0.5 <= few[1] and many[0] < 0.5 < many[1]


def test_cli_analyze_writes_json_and_markdown(study, tmp_path, capsys):
    import json

    from ccp.cli.study import main

    client, token, db = study["client"], study["tokens"]["alice"], study["db"]
    while "pair_id" in (page := client.get(f"/r/{token}")).text:
        form = next_form(page.text)
        pair = db_rows(db, "SELECT method_left, broken_side FROM pairs WHERE id = ?", (form["pair_id"],))[0]
        # always ours where ours is shown; never the broken image
        choice = ("right" if pair[1] == "left" else "left") if pair[1] else ("left" if pair[0] == "ours" else "right")
        client.post(f"/r/{token}/vote", data={**form, "choice": choice})
    main(["analyze", "study=smoke", f"samples={study['samples']}", f"db={db}", f"analysis.output_dir={tmp_path / 'out'}"])
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert result["excluded"] == [] and result["votes"]["total"] == 8
    assert {m: e["rate"] for m, e in result["win_rate"].items() if e["n"]} == {m: 1.0 for m, e in result["win_rate"].items() if e["n"]}
    assert result["win_rate"]["dreambooth"]["n"] + result["win_rate"]["oft"]["n"] == sum(
        1 for r in db_rows(db, "SELECT method_left, method_right FROM pairs p JOIN raters r ON r.id = p.rater_id "
                               "WHERE r.name = 'alice' AND broken_side IS NULL") if "ours" in r)
    assert (tmp_path / "out" / "analysis.md").read_text().startswith("# Preference study smoke")
    from ccp.study.analysis import pref_column

    assert pref_column(tmp_path / "out" / "analysis.json") == result["pref"]
    assert pref_column(db)["dreambooth"]["n"] == result["win_rate"]["dreambooth"]["n"]
    with pytest.raises(ConfigError, match="run ccp-study analyze first"):
        pref_column(tmp_path / "missing.json")
    assert "Win rate of ours" in capsys.readouterr().out


def test_cli_refuses_bad_input_with_the_fix(tmp_path):
    from ccp.cli.study import main

    with pytest.raises(SystemExit, match="give the action first"):
        main(["samples=x"])
    with pytest.raises(SystemExit, match="ccp-study: error: samples=.*no such folder"):
        main(["serve", "study=smoke", f"samples={tmp_path / 'none'}", f"db={tmp_path / 'db.sqlite'}"])
    with pytest.raises(SystemExit, match="ccp-study: error: db=.*no study database"):
        main(["analyze", f"db={tmp_path / 'none.sqlite'}"])
    with pytest.raises(SystemExit, match="ccp-study: error: .*(nosuch|Could not)"):
        main(["analyze", "study=nosuch"])
    with pytest.raises(SystemExit, match="host=0.0.0.0 serves plain HTTP"):
        main(["serve", "study=smoke", f"samples={make_samples(tmp_path / 's')}", "host=0.0.0.0"])

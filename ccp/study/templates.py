"""The study's pages, server-rendered with Jinja2; kept in Python so they ship with the package."""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>{% block title %}Preference study{% endblock %}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1.2em; color: #222; }
 h1 { font-size: 1.3em; } .muted { color: #666; font-size: .9em; }
 .pair { display: flex; gap: 1.5em; justify-content: center; margin: 1.2em 0; }
 .pair button { border: 3px solid #ccc; border-radius: 8px; padding: 6px; background: #fafafa; cursor: pointer; }
 .pair button:hover, .pair button:focus { border-color: #2a6ad3; }
 .pair img { display: block; width: min(42vw, 60vh, 460px); height: auto; }  /* both images and the question on one screen */
 .pair .key { display: block; margin-top: .4em; font-size: .95em; }
 progress { width: 100%; height: 1em; }
 table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .3em .7em; text-align: left; }
 .bad { color: #b00; }
</style></head>
<body>{% block body %}{% endblock %}</body></html>
"""

RATE = """{% extends "base.html" %}
{% block body %}
<h1 id="question">{{ question }}</h1>
<progress value="{{ done }}" max="{{ total }}"></progress>
<p class="muted">Pair {{ done + 1 }} of {{ total }}. Click the better image, or press &larr; / F for the left one and
&rarr; / J for the right one. You can close this page at any time and come back with the same link: every answer is saved.</p>
<form id="vote" method="post" action="{{ vote_url }}">
 <input type="hidden" name="pair_id" value="{{ pair_id }}">
 <input type="hidden" name="csrf" value="{{ csrf }}">
 <div class="pair">
  <button type="submit" name="choice" value="left" id="left"><img src="{{ left_url }}" alt="left image"><span class="key">&larr; left (F)</span></button>
  <button type="submit" name="choice" value="right" id="right"><img src="{{ right_url }}" alt="right image"><span class="key">right (J) &rarr;</span></button>
 </div>
</form>
<script>
 // One submission per page: a second click or key press while the vote is in flight does nothing.
 const form = document.getElementById("vote");
 let sent = false;
 form.addEventListener("submit", (e) => { if (sent) { e.preventDefault(); } sent = true; });
 document.addEventListener("keydown", (e) => {
   const side = {ArrowLeft: "left", f: "left", F: "left", ArrowRight: "right", j: "right", J: "right"}[e.key];
   if (side && !sent) { e.preventDefault(); document.getElementById(side).click(); }
 });
</script>
{% endblock %}
"""

DONE = """{% extends "base.html" %}
{% block body %}
<h1 id="done">Thank you: all {{ total }} pairs are answered.</h1>
<p>Your answers are saved. You can close this page.</p>
{% endblock %}
"""

MESSAGE = """{% extends "base.html" %}
{% block body %}<h1>{{ title }}</h1><p>{{ message }}</p>{% endblock %}
"""

ADMIN = """{% extends "base.html" %}
{% block title %}Study admin: {{ name }}{% endblock %}
{% block body %}
<h1>Study {{ name }}: {{ votes }} of {{ total }} answers</h1>
<p class="muted">{{ question }}</p>
<h2>Raters</h2>
<table id="raters"><tr><th>rater</th><th>answered</th><th>of</th><th>attention checks failed / answered</th><th>last answer (UTC)</th><th>status</th><th></th></tr>
{% for r in raters %}
<tr><td>{{ r.name }}</td><td>{{ r.voted }}</td><td>{{ r.total }}</td>
<td class="{{ 'bad' if r.checks_failed else '' }}">{{ r.checks_failed }} / {{ r.checks_answered }}</td>
<td>{{ r.last_vote or "-" }}</td><td>{{ "revoked" if r.revoked else ("done" if r.voted == r.total else "open") }}</td>
<td>{% if not r.revoked %}<form method="post" action="{{ revoke_url }}"><input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="rater" value="{{ r.name }}"><button type="submit">revoke</button></form>{% endif %}</td></tr>
{% endfor %}
</table>
<h2>Method pairs</h2>
<table id="method-pairs"><tr><th>method A</th><th>method B</th><th>answered</th><th>of</th><th>A preferred</th><th>B preferred</th></tr>
{% for p in method_pairs %}
<tr><td>{{ p.a }}</td><td>{{ p.b }}</td><td>{{ p.voted }}</td><td>{{ p.total }}</td><td>{{ p.wins_a }}</td><td>{{ p.wins_b }}</td></tr>
{% endfor %}
</table>
<p class="muted">Attention checks are not counted in the method pairs. <code>ccp-study analyze</code> gives win rates with
confidence intervals and Bradley&ndash;Terry scores.</p>
{% endblock %}
"""

TEMPLATES = {"base.html": BASE, "rate.html": RATE, "done.html": DONE, "message.html": MESSAGE, "admin.html": ADMIN}

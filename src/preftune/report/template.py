"""The report page's jinja2 template (autoescaped): one offline HTML file, styles inline, figures as
data URIs, no script and no external resource."""

from __future__ import annotations

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222; background: #f6f7f9; }
header { background: #24292f; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; font-size: 13px; color: #c9d1d9; }
nav { font-size: 13px; margin-top: 6px; }
nav a { color: #9cc8ff; margin-right: 12px; text-decoration: none; }
main { padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; margin: 14px 0; padding: 10px 16px; }
h2 { font-size: 16px; margin: 4px 0 10px; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
.grid img { border: 1px solid #eee; border-radius: 4px; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8dee4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 8px; overflow: auto; font-size: 12px; max-height: 420px; white-space: pre-wrap; }
.gen td { white-space: pre-wrap; max-width: 360px; font-size: 12px; }
.muted { color: #666; font-size: 13px; }
</style></head>
<body>
<header><h1>{{ title }}</h1><p>{{ subtitle }}</p>
<nav>{% for id, label in sections %}<a href="#{{ id }}">{{ label }}</a>{% endfor %}</nav></header>
<main>
<section id="summary"><h2>Summary</h2>
{% if summary_rows %}
<table><tr><th>metric</th>{% for run in runs %}<th>{{ run.name }}: train</th><th>{{ run.name }}: eval</th>{% endfor %}</tr>
{% for row in summary_rows %}<tr><td>{{ row.name }}</td>{% for v in row.cells %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p class="muted">Nothing logged yet.</p>{% endif %}
</section>
<section id="curves"><h2>Training and evaluation curves</h2>
{% if curves %}<div class="grid">{% for c in curves %}<img alt="{{ c.name }}" src="{{ c.uri }}">{% endfor %}</div>
{% else %}<p class="muted">No metric logged yet (see --logging_steps).</p>{% endif %}
</section>
<section id="margins"><h2>Reward margins on the eval split, before vs after training</h2>
{% for m in margins %}{% if runs|length > 1 %}<h3>{{ m.name }}</h3>{% endif %}<img alt="margins {{ m.name }}" src="{{ m.uri }}">{% endfor %}
{% if not margins %}<p class="muted">No eval split in {{ 'these runs' if runs|length > 1 else 'this run' }} (--eval_ratio or --eval_file), or the run has not finished yet.</p>{% endif %}
</section>
<section id="data"><h2>Data</h2>
{% for run in data %}{% if runs|length > 1 %}<h3>{{ run.name }}</h3>{% endif %}
{% if run.lengths_uri %}<img alt="token lengths" src="{{ run.lengths_uri }}">{% endif %}
{% if run.text %}<pre>{{ run.text }}</pre>{% else %}<p class="muted">No data report.</p>{% endif %}
{% endfor %}
</section>
{% if generations %}<section id="generations"><h2>Generations on eval prompts</h2>
{% for g in generations %}{% if runs|length > 1 %}<h3>{{ g.name }}</h3>{% endif %}
<table class="gen"><tr><th>#</th><th>prompt</th>{% for col in g.columns %}<th>{{ col }}</th>{% endfor %}</tr>
{% for row in g.rows %}<tr><td>{{ loop.index }}</td><td>{{ row.prompt }}</td>{% for col in g.columns %}<td>{{ row[col] }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endfor %}
</section>{% endif %}
<section id="config"><h2>Resolved configuration</h2>
{% for run in configs %}{% if runs|length > 1 %}<h3>{{ run.name }}</h3>{% endif %}
{% if run.text %}<pre>{{ run.text }}</pre>{% else %}<p class="muted">Not written yet.</p>{% endif %}
{% endfor %}
</section>
</main></body></html>
"""


def render(**context) -> str:
    """The page for ``context`` (see :func:`preftune.report.render_runs`), autoescaped."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(**context)

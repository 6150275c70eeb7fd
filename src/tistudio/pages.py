"""What tistudio's self-contained HTML pages share (the run report, the prepare report, the demo report): one style,
and pictures inlined as data URIs so that a page can be mailed or opened anywhere without a server or network."""

from __future__ import annotations

import base64
from pathlib import Path


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.banner{background:#fff4d6;border:1px solid #e6c36a;padding:.8em 1em;border-radius:6px}
.muted{color:#777}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;text-align:center}figure img{width:160px;height:160px;image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:12px;color:#555;max-width:160px;word-wrap:break-word}
pre{background:#f5f5f5;padding:.8em;white-space:pre-wrap;word-break:break-word;border-radius:4px}table{border-collapse:collapse}
td{padding:2px 10px 2px 0;vertical-align:top}
"""

"""What every page the gateway serves shares: the document around it and its base styles (a page adds its own)."""

from __future__ import annotations

from html import escape

BASE_STYLE = """
*,*::before,*::after{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f6f7fb}
main{max-width:72rem;margin:0 auto;padding:2rem 1rem 3rem}
h1{font-size:2rem;line-height:1.2;margin:0 0 .5rem;text-align:center}
.lead{margin:0 auto 2rem;max-width:36rem;text-align:center;color:#4a5368}
"""


def document(title: str, style: str, body: str) -> str:
    """A whole HTML page: `body` (already escaped) inside <main>, the base styles then `style`."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{BASE_STYLE}{style}</style></head><body><main>{body}</main></body></html>"
    )

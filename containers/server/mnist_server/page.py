"""Page at ``/`` for drawing a digit and showing its prediction.

The page is one self-contained HTML file with inline CSS and JavaScript and
no external URLs, so it works offline. It posts each drawing to the
relative URL ``predict``.
"""

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

# Read once at import. The file ships as package data (`static/*` in pyproject.toml).
PAGE_HTML = (resources.files("mnist_server") / "static" / "index.html").read_text(
    encoding="utf-8"
)

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def read_draw_page() -> HTMLResponse:
    """Serve the page for drawing a digit and seeing its prediction."""
    return HTMLResponse(PAGE_HTML)

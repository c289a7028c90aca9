"""mkdocs hooks: pages generated at build time, so the site never holds a stale copy.

- ``config.md``: the configuration reference, from the pydantic schema (pstage.config.render);
- ``results.md``: benchmarks/RESULTS.md, where every measurement lives once.

The pages in docs/ link to the repository's files (``../benchmarks/RESULTS.md#anchor``, the shipped
``../src/pstage/configs/default.yaml``), so they work on a code host too; on the site those links
point at the generated pages, where ``mkdocs build --strict`` checks every anchor.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's pstage, whatever the environment has installed

from pstage.config.render import reference_markdown  # noqa: E402

ON_SITE = {"](../benchmarks/RESULTS.md": "](results.md", "](../src/pstage/configs/default.yaml)": "](config.md)"}


def on_files(files: Files, config) -> Files:
    """Add the generated pages to the site."""
    files.append(File.generated(config, "config.md", content=reference_markdown(results="results.md")))
    files.append(File.generated(config, "results.md", content=(ROOT / "benchmarks" / "RESULTS.md").read_text()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Repository links -> the generated pages."""
    for repo, site in ON_SITE.items():
        markdown = markdown.replace(repo, site)
    return markdown

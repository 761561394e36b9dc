"""What users see in the Prefect UI: run artifacts (tables, markdown, links)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def _key(text: str) -> str:
    # Artifact keys: lowercase letters, numbers and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_table(key: str, rows: Sequence[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=_key(key), table=list(rows), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=_key(key), markdown=markdown, description=description)


def publish_link(key: str, link: str, text: str, description: str) -> None:
    create_link_artifact(key=_key(key), link=link, link_text=text, description=description)

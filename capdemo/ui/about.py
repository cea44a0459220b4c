"""The About tab: the loaded bundle as readable tables, with nothing of the server's file system in it.

Components with their files' total size, every file with its size and shortened sha256, and a training summary
(the recipe's and the build's single-valued fields); nested training records stay in the downloadable
``bundle.json`` rather than being dumped onto the page.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

SHA_SHOWN = 12  # hex digits of each file's sha256 shown (the manifest keeps all 64)


def human_size(count: int) -> str:
    """Bytes as a short readable size: 2276 -> "2.2 KB", 7267290 -> "6.9 MB"."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def files_table(files: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per bundle file: its path inside the bundle, size and shortened sha256."""
    rows = [(rel, human_size(entry.get("bytes", 0)), entry["sha256"][:SHA_SHOWN])
            for rel, entry in sorted(files.items())]
    return pd.DataFrame(rows, columns=["file", "size", "sha256"])


def components_table(components: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]],
                     labels: Mapping[str, str]) -> pd.DataFrame:
    """One row per component: its display name, how many files sit in its folder and their total size."""
    rows = []
    for name in components:
        inside = [entry for rel, entry in files.items() if rel.split("/", 1)[0] == name]
        rows.append((labels.get(name, name), len(inside), human_size(sum(e.get("bytes", 0) for e in inside))))
    return pd.DataFrame(rows, columns=["component", "files", "size"])


MAX_TEXT_SHOWN = 200  # longer text fields (e.g. a whole command line) are left to bundle.json


def scalar_items(record: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """The single-valued fields of ``record`` and of its first-level dicts, as ("a.b", "value") pairs."""
    items = []
    for key, value in record.items():
        if isinstance(value, Mapping) and not prefix:
            items += scalar_items(value, prefix=f"{key}.")
        elif isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= MAX_TEXT_SHOWN):
            items.append((prefix + key, str(value)))
    return items


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (pipes in cells escaped)."""
    def row(cells: Any) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    body = [row(cells) for cells in table.itertuples(index=False)]
    return "\n".join([row(table.columns), row(["---"] * len(table.columns)), *body])


def about_markdown(info: Mapping[str, Any], labels: Mapping[str, str], domain_summary: str = "") -> str:
    """The About tab's text: the bundle, its components, training summary, files and how to load another."""
    files = info.get("file_entries", {})
    lines = [
        f"### Loaded bundle: `{info['name']}` ({info['world']} world)",
        info.get("description", ""),
        "",
        *([f"**Domain:** {domain_summary}", ""] if domain_summary else []),
        f"**Methods:** {', '.join(labels.get(m, m) for m in info['methods'])} · **Device:** {info['device']}, "
        f"serving at **{info['precision']}** (`--precision fp32|bf16|int8`)",
        "",
        "#### Components",
        markdown_table(components_table(info.get("components", {}), files, labels)),
        "",
    ]
    training = scalar_items(info.get("training") or {})
    if training:
        lines += ["#### Training summary", markdown_table(pd.DataFrame(training, columns=["field", "value"])),
                  ""]
    lines += [
        f"#### Files ({len(files)}, each checked against its sha256 at load)",
        markdown_table(files_table(files)),
        "",
        "**Loading another bundle:** `python app.py --weights path/to/bundle`, or "
        "`python app.py --weights hf-hub:org/name@revision` (pin the revision), or set `CAPDEMO_WEIGHTS`.",
    ]
    return "\n".join(lines)


__all__ = ["about_markdown", "components_table", "files_table", "human_size", "markdown_table", "scalar_items"]

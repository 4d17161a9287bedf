"""``python -m csce_jax.config``: every config field as a Markdown table (docs/training.md
holds its output), or ``--presets`` the preset names."""

from __future__ import annotations

import sys

from csce_jax.config.files import presets
from csce_jax.config.schema import FIELDS


def fields_table() -> str:
    """One row per field: key, default, allowed values, whether a resume may change it, doc."""
    rows = ["| field | default | allowed | resume may change | meaning |", "|---|---|---|---|---|"]
    for f in FIELDS:
        allowed = " ".join(f"`{c}`" for c in f.choices) if f.choices else ""
        doc = f.doc.replace("|", "\\|")
        rows.append(
            f"| `{f.key}` | `{f.default!r}` | {allowed} | {'yes' if f.resumable else ''} | {doc} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(" ".join(presets()) if "--presets" in sys.argv[1:] else fields_table())

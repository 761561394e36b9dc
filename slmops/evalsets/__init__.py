"""The evaluation sets that ship with slmops (JSON Lines, one file per model family)."""

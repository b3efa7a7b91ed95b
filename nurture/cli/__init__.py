"""The ``nurture`` command: every subcommand, and ``nurture up`` (the whole local stack)."""

"""The operator's entry point: a Temporal worker that runs journeys.

    python worker.py            (or: nurture worker)

Configured by the environment; see :mod:`nurture.service.worker`.
"""

from nurture.service.worker import main

if __name__ == "__main__":
    main()

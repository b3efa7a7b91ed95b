"""The marketer's console: web pages on the event API's process (see :mod:`nurture.console.app`)."""

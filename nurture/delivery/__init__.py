"""Sending one step: channel choice, subscriptions, frequency caps, quiet hours, rendering and the
send ledger (:mod:`.deliverer`), the policy arithmetic, and signed unsubscribe links. Sits on the
channel adapters (the top-level ``channels`` package)."""

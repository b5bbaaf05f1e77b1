"""Webhooks: the sender (outbox sweeping, retries, throttled events) and the signing of both surfaces."""

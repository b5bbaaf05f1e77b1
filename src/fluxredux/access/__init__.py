"""Who may do what: API keys, share links, uploads and idempotency keys.

Each module holds one seam's protocol, its dataclasses and the rules every engine shares
(key format and checking, token and id formats, expiry); the engines implementing them
live in ``fluxredux.backends``.
"""

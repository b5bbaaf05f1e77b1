"""Test doubles: in-memory implementations of the job store, worker registry and webhook
outbox, for fast unit tests of the code above them. No process runs them in production;
they pass the same contract suites as the real engines.
"""

"""The offload errors that entry points show users, in a module that loads no grpc."""

from __future__ import annotations


class WorkerRefused(Exception):
    """This worker may not be used (not paired with us, revoked, wrong protocol); the message says why."""

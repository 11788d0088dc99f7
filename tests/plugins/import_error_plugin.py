"""Fixture plugin that fails at import, as a plugin whose vendor SDK is missing would."""

from __future__ import annotations

import acme_vendor_sdk_that_is_not_installed  # noqa: F401

from pagedllm.backends.hookspecs import hookimpl


@hookimpl
def pagedllm_register_backends() -> list[type]:
    """Never reached."""
    return []

"""Helpers shipped for tests and the conformance kit: tiny Hugging Face checkpoints built on the fly."""

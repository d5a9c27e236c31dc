"""Mechanisms shared by the orchestrator and the participant library: how a message is consumed
and when one that keeps failing is poison."""

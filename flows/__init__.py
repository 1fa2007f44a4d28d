"""Prefect flows that wire the stages; all caching decisions come from the artifact store."""

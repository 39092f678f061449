"""Orchestration under the CLI: a run, a compare, a ledger of requests, the demo and its victim, a scan."""

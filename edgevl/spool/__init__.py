"""Durable state of the inputs: the job spool, and the ledger of what is in hand."""

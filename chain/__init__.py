"""The replicated application: on-chain records, the chain state and the round (pure)."""

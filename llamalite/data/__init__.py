"""Text -> token shards -> batches: `prepare` builds shards, `TokenLoader` reads them; `sft` reads instruction data."""

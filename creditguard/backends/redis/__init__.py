"""The Redis backend: account state shared by every process using one Redis."""

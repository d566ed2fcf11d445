"""The memory backend: account state in this process."""

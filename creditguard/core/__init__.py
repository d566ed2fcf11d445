"""The core: one account's rules, the guard's flows and the two drivers that run them; no
HTTP client and no Redis."""

"""Lensmor's API: the balance client, retries, what a paid call reports, precheck, the
contact-unlock task helper."""

"""The facade: ``CreditGuard``, ``Spend``, ``Hold`` and the decorator, thin over the
core's flows."""

"""Where account state lives: in this process (``memory``) or in Redis (``redis``)."""

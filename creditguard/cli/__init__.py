"""The ``creditguard`` command."""

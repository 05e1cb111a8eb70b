"""Scheduler: the front door; routes each request to a prompt worker and a token worker."""

"""Accounts an admin creates: set-password links and the admin's password reset from the CLI."""

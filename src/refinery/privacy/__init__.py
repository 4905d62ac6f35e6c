"""Personal data handling, in one place (pseudonymisation and the vault arrive with governance)."""

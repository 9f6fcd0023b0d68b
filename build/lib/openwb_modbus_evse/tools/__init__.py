"""What users run besides the service: the virtual station, the demo, the status client and
the admin API client."""

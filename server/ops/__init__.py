"""Operating the service: metrics, traces, probes, backups and demo data."""

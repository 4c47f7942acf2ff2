"""Data loading, alignment training, ingest jobs and evaluation."""

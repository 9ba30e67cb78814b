"""The worker process around the engine: its HTTP service (`app.py`, entry point `python -m
workers.service`), its config, heartbeat and load report, the adapter fetcher and its folder cache, the
cluster-signature middleware, drain, metrics collectors. Imports nothing itself, so importing one of its
modules does not start the app's imports."""

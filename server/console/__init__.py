"""The web console's static files (`static/`), served by the gateway at `/ui` (server.routes.console)."""

"""Running: the backends, the generation loop and its sessions, Genie, the HTTP server."""

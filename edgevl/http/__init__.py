"""The local HTTP API, its commissioning page and metrics, served by waitress in a thread of the daemon."""

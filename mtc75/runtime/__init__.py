"""The runtime: permits, the dispatcher, runners and handlers -- everything that runs on more than one thread."""

"""`eep serve`: a running instance that answers requests on a Unix socket (see `server`)."""

"""One module per `cpuft` subcommand; each has `register(subparsers)` and parses, validates, hands off."""

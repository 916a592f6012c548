"""fedhelix command line: one program, a command per persona (see ``fedhelix --help``)."""

"""dgf I/O server: a site's object store behind the ``dgf-io`` SSH subsystem."""

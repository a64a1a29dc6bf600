"""dgf metadata server: namespace, XML headers, identity vault, principals, audit."""

"""golf: the Parameter Golf pipeline's configuration, DAG, command line and bundled data."""

"""Running holopipe: the command line, provenance records for the report, the workflow's cost model."""
